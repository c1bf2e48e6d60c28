"""How the model is split and where it runs: process groups, devices, and the CPU compat layer."""

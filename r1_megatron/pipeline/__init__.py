"""`r1m pipeline`: the R1 recipe as a list of stages (run.py), checked and resolved from its YAML
(spec.py) and run kind by kind (stages.py). Above rl/, distill/ and eval/, whose loops it runs."""

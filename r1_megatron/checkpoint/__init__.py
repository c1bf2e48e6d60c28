"""Checkpoints: the HF name table (hf.py), HF directories (hf_io.py), megatron dist_checkpointing
(mcore_io.py), conversion and scoring (their `r1m convert` / `r1m score` commands are in cli/)."""

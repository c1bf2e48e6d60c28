"""Checkpoint formats: the HF name table (hf.py), the model card against an HF config (hf_card.py),
HF directories (hf_io.py, hf_shard.py), megatron dist_checkpointing (mcore_io.py, dist.py) and file
integrity (integrity.py). The jobs that build models to convert or score are train/'s."""

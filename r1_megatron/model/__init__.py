"""DeepSeek-V3 (MLA + DeepSeekMoE + MTP) and dense students on megatron-core.

`build_model(card, parallel)` in provider.py is the entry point.
"""

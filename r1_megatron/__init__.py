"""r1-megatron: DeepSeek-R1 GRPO on megatron-core."""

"""The generic megatron training layer: the Trainer, microbatches, the forward-only model holder, the
one SFT loop, initial weights and the HF export, and the step metrics log. Below rl/, distill/ and
eval/; above model/, parallel/, checkpoint/ and data/."""

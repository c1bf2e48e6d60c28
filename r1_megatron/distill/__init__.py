"""Distillation and the R1 recipe's rejection-sampling stage (docs/architecture.md#the-r1-recipe).

Modules: rejection (sample k responses per prompt, keep the verified and readable ones, mix in
non-reasoning pairs, write an SFT JSONL with provenance).
"""

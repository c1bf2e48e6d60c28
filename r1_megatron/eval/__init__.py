"""Evaluation (SPEC §8): pass@1, cons@k and pass@k of a checkpoint's samples, checked by the verifiers.

Modules: metrics (pure metric functions), scoring (items, verifiers in the reward pool, generate and
score), runner (`evaluate` and the report); `r1m eval` is cli/eval.py.
"""

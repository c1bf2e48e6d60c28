"""Evaluation (docs/architecture.md): pass@1, cons@k, pass@k of a checkpoint's samples, checked by verifiers.

Modules: metrics (pure metric functions), scoring (items, verifiers in the reward pool, generate and
score), runner (`evaluate` and the report); `r1m eval` is cli/eval.py.
"""

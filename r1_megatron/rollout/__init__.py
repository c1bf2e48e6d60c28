"""Rollout: the engine interface, vLLM, and weight export for refits (EPLB placement is in moe/)."""

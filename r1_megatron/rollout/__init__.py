"""Rollout: the engine interface, vLLM, weight export for refits, and EPLB expert placement."""

"""Reward functions registered by name: fn(response: str, ground_truth) -> RewardResult.

The config (reward.weights) picks components and their weights; the total is sum_k w_k * r_k.
A failure is never a silent 0: it sets `error` to a short type name (e.g. "timeout", "parse_error",
"sandbox:memory"), which the pool counts per type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardResult:
    """score in [0, 1] (or a penalty below 0); components: named sub-scores; error: type of failure or None."""

    score: float
    components: dict[str, float] = field(default_factory=dict)
    error: str | None = None


RewardFn = Callable[[str, Any], RewardResult]
_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` selectable as reward component `name`."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward function '{name}' registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def get(name: str) -> RewardFn:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward function '{name}'; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    """Import the modules that register the built-in components (math, format, language, code)."""
    import importlib

    for mod in ("math_reward", "format_reward", "language", "code"):
        try:
            importlib.import_module(f"r1_megatron.reward.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"r1_megatron.reward.{mod}":
                raise

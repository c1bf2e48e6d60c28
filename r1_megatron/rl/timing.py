"""Wall time per phase of a GRPO step (refit, rollout, logprobs, train), logged as time/<phase>."""

from __future__ import annotations

import time


class PhaseTimer:
    """Wall time per phase of a step: `with timer("rollout"): ...`; `timer.metrics()` -> time/<phase>."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + time.perf_counter() - self.t0

        return _Span()

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {"time/step": sum(self.seconds.values())}

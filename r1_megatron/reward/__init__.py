"""Rule-based rewards (docs/grpo.md): registered components, their weighted total, and the scoring pool.

The total is sum_k w_k * r_k over the components named in `reward.weights` that apply to the sample.
What each component is scored against comes from the sample's ground truth:

- a plain value (string or number) means {"answer": value};
- "accuracy" (math) reads ground_truth["answer"] and is skipped when there is none;
- "code" reads the whole dict ({"tests": [...]}) and is skipped when it has no "tests";
- "format" needs nothing;
- "language" reads ground_truth["language"], else the configured target language;
- any other registered component reads ground_truth[name] when present, else the whole dict.

So one weight table serves a batch that mixes math and code prompts. Skipped components are not in the
total and not in the breakdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r1_megatron.config.schema import SandboxConfig
from r1_megatron.reward.registry import RewardResult, get, names, register

__all__ = [
    "SKIP",
    "RewardResult",
    "WeightedScorer",
    "component_truth",
    "get",
    "names",
    "register",
    "score_sample",
]

SKIP = object()  # component_truth's answer for "this sample carries nothing for that component"


def component_truth(name: str, ground_truth: Any, language: str = "en") -> Any:
    """What component `name` scores against for this sample, or SKIP (see the module docstring)."""
    truth = ground_truth if isinstance(ground_truth, dict) else {"answer": ground_truth}
    if name == "accuracy":
        return truth["answer"] if truth.get("answer") is not None else SKIP
    if name == "code":
        return truth if "tests" in truth else SKIP
    if name == "format":
        return None
    if name == "language":
        return truth.get("language", language)
    return truth.get(name, truth)


def score_sample(
    response: str, ground_truth: Any, weights: dict[str, float], language: str = "en"
) -> RewardResult:
    """Weighted total of the applicable components, with every component and error recorded.

    components: {k: r_k} plus each component's own sub-scores as "k/sub" and "k/error": 1.0 for a
    component that failed. error: the failing components' error types joined by ","; an exception
    inside a component becomes "exception:<ExceptionType>" rather than escaping.
    """
    total, components, errors = 0.0, {}, []
    for name, weight in weights.items():
        truth = component_truth(name, ground_truth, language)
        if truth is SKIP:
            continue
        try:
            result = get(name)(response, truth)
        except Exception as e:  # a bug in a component must be counted, not crash the batch
            result = RewardResult(0.0, {}, f"exception:{type(e).__name__}")
        total += weight * result.score
        components[name] = result.score
        components.update({f"{name}/{k}": v for k, v in result.components.items() if k != name})
        if result.error:
            components[f"{name}/error"] = 1.0
            errors.append(result.error)
    return RewardResult(total, components, ",".join(errors) or None)


@dataclass
class WeightedScorer:
    """The default scorer: `score_sample` with fixed weights and target language (picklable). The code
    component's sandbox limits and mode are module state in reward/code.py, set by prepare()."""

    weights: dict[str, float]
    language: str = "en"
    sandbox: SandboxConfig | None = None
    code_mode: str = "fraction"

    def __call__(self, response: str, ground_truth: Any) -> RewardResult:
        return score_sample(response, ground_truth, self.weights, self.language)

    def prepare(self) -> None:
        """Once per process before scoring: import the components, configure the code sandbox, and run
        the math check once so its first-call setup (parser tables) is not charged to an item's timeout."""
        names()
        if "code" in self.weights:
            from r1_megatron.reward.code import configure

            configure(self.sandbox, self.code_mode)
        if "accuracy" in self.weights:
            get("accuracy")(r"\boxed{\frac{1}{2}}", "0.5")

    def extra_seconds(self, ground_truth: Any) -> float:
        """Time a sample may take beyond reward.timeout_s: a code sample gets the sandbox's own outer
        deadline (sandbox.py: 10 s start-up + per test wall_seconds + 3 s), so the sandbox reports its
        typed reason ("sandbox:timeout") before the pool would kill the worker."""
        truth = component_truth("code", ground_truth, self.language)
        if "code" not in self.weights or truth is SKIP or not isinstance(truth.get("tests"), list):
            return 0.0
        wall = (self.sandbox or SandboxConfig()).wall_seconds
        return 10.0 + len(truth["tests"]) * (wall + 3.0)

"""Code reward (docs/grpo.md#rewards): run the response's last fenced python block against test cases.

A test case is {"stdin": str, "stdout": str} (stdin may be absent: empty input) or {"assert": str}
(python run after the program, in its namespace). An stdin test passes when the program exits 0 and
its stdout equals the expected one after stripping trailing whitespace on each line and trailing blank
lines. An assert test passes when the program and the asserts run to the end and exit 0 (a program
that exits early, `exit(0)` or `os._exit(0)`, fails: the sandbox requires a proof line printed after the
asserts), and every assert holds when judged by value out here (reward/assert_values.py): the
candidate's results leave the sandbox as plain data and are compared with the expected values, which
never enter it.

Reward: the fraction of tests passed ("fraction", default) or 1 only when all pass ("all"). Any
sandbox limit violation gives 0 with its typed reason ("sandbox:timeout", "sandbox:memory", ...) in
`error`, in either mode. A response without a python block gives 0 with error "no_code". A result
that is not plain data (an object with its own __eq__, __hash__ or __repr__, a subclass of int, ...)
gives 0 with error "untrusted_result", in either mode.

The asserts assert_values.py cannot take apart (in loops, in helper functions such as `check(f)`, or
with a comprehension next to an expected value) still run in the program's own process; there every
value they judge must be plain data too, or the test is untrusted (assert_values.py `judged`). What
stays open there is code that attacks the harness itself rather than lying through a result: the
program runs in the same interpreter and can reach the runner's frames (sys._getframe, gc), where the
proof marker lives. stdin/stdout tests have no such gap.
"""

from __future__ import annotations

import json
import re

from r1_megatron.config.schema import SandboxConfig
from r1_megatron.reward import assert_values
from r1_megatron.reward.registry import RewardResult, register
from r1_megatron.reward.sandbox import run_tests

# A fence line (``` plus an optional language tag), the body, and the closing fence at a line start.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[ \t]*\r?\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}
_MODES = ("fraction", "all")

_defaults: dict = {"sandbox_cfg": None, "mode": "fraction"}


def configure(sandbox_cfg: SandboxConfig | None = None, mode: str = "fraction") -> None:
    """Set the sandbox limits and the mode that the registered `code` component uses (once per worker,
    from reward.sandbox and reward.code_mode)."""
    _check_mode(mode)
    _defaults.update(sandbox_cfg=sandbox_cfg, mode=mode)


def extract_code(response: str) -> str | None:
    """The last ```python (or ```py) block of the answer part, the text after the last </think>;
    failing that, the last untagged ``` block. None when there is neither."""
    answer = response.rsplit("</think>", 1)[-1]
    blocks = _FENCE.findall(answer)
    tagged = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    untagged = [body for tag, body in blocks if not tag]
    picked = tagged or untagged
    return picked[-1] if picked else None


def normalize_output(text: str) -> str:
    """Trailing whitespace stripped from every line, trailing blank lines dropped."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def score_program(
    program: str, tests: list[dict], sandbox_cfg: SandboxConfig | None = None, mode: str = "fraction"
) -> RewardResult:
    """Run `program` on `tests` in the sandbox; score = fraction passed ("fraction") or all-or-nothing ("all")."""
    _check_mode(mode)
    _check_tests(tests)
    plans = [assert_values.plan(t["assert"]) if "assert" in t else None for t in tests]
    cases = [t if p is None else {"steps": p.steps} for t, p in zip(tests, plans, strict=True)]
    run = run_tests(program, cases, sandbox_cfg)
    verdicts = [_verdict(result, test, p) for result, test, p in zip(run.tests, tests, plans)]
    passed = sum(v is True for v in verdicts)
    components = {"passed": float(passed), "total": float(len(tests))}
    if run.violation is not None:
        return RewardResult(0.0, components, error=run.violation)
    if "untrusted" in verdicts:
        return RewardResult(0.0, components, error="untrusted_result")
    score = passed / len(tests) if mode == "fraction" else float(passed == len(tests))
    return RewardResult(score, components)


@register("code")
def code_reward(response: str, ground_truth) -> RewardResult:
    """ground_truth: {"tests": [...]} (or its JSON text)."""
    if isinstance(ground_truth, str):
        ground_truth = json.loads(ground_truth)
    if not isinstance(ground_truth, dict) or "tests" not in ground_truth:
        raise ValueError(
            f"code reward: ground_truth must be a dict with 'tests', got {type(ground_truth).__name__}"
        )
    tests = ground_truth["tests"]
    _check_tests(tests)
    program = extract_code(response)
    if program is None:
        return RewardResult(0.0, {"passed": 0.0, "total": float(len(tests))}, error="no_code")
    return score_program(program, tests, _defaults["sandbox_cfg"], _defaults["mode"])


def _verdict(result, test: dict, plan: assert_values.AssertPlan | None) -> bool | str:
    """True (passed), False (failed) or "untrusted" (a judged value was not plain data, out here or in
    the sandbox)."""
    if result.untrusted:
        return "untrusted"
    if not result.completed:
        return False
    if plan is not None:
        try:
            return plan.verdict(result.probes)
        except assert_values.Untrusted:
            return "untrusted"
        except Exception:  # noqa: BLE001 - a malformed probe line (forged by the program) fails the test
            return False
    got = result.stdout.decode("utf-8", errors="replace")
    return normalize_output(got) == normalize_output(test["stdout"])


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"reward.code_mode: expected one of {list(_MODES)}, got {mode!r}")


def _check_tests(tests) -> None:
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"code tests: expected a non-empty list, got {tests!r:.80}")
    for i, test in enumerate(tests):
        keys = set(test) if isinstance(test, dict) else None
        well_formed = keys == {"assert"} or keys in ({"stdout"}, {"stdin", "stdout"})
        if well_formed and all(isinstance(v, str) for v in test.values()):
            continue
        raise ValueError(
            f"code tests[{i}]: expected {{'stdin': str, 'stdout': str}} or {{'assert': str}}, got {test!r:.120}"
        )

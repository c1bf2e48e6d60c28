"""`r1m reward`: score one answer or one program, print one JSON line {"score", "components", "error"}.

    r1m reward math --response '... \\boxed{1/2}' --answer 0.5
    r1m reward math --response-file out.txt --answer '\\frac{1}{2}' --timeout 5
    r1m reward code --program solution.py --tests tests.json [--mode all]

The math check runs in a one-worker RewardPool, so a pathological answer is killed at --timeout exactly
as in training. The program runs in the sandbox (reward/code.py). tests.json is a list of tests, or
{"tests": [...]}; a test is {"stdin": ..., "stdout": ...} (stdin optional) or {"assert": ...}.

Exit status: 0 when a result was printed (whatever the score; its "error" says if scoring failed),
2 for bad arguments or unreadable input, with a one-line message naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r1_megatron.reward.registry import RewardResult


_TEST_KEYS = ({"stdin", "stdout"}, {"stdout"}, {"assert"})


class InputError(ValueError):
    """Unreadable or malformed input, stated in one line that names the file."""


def _read_text(path: str, flag: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{flag} {path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{flag} {path}: cannot read: {e}") from None


def load_tests(path: str) -> list[dict]:
    """The test list of a tests JSON file, checked item by item."""
    text = _read_text(path, "--tests")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise InputError(f"--tests {path}: invalid JSON at {where}: {e.msg}") from None
    tests = data.get("tests") if isinstance(data, dict) else data
    if not isinstance(tests, list) or not tests:
        raise InputError(f'--tests {path}: expected a non-empty list of tests or {{"tests": [...]}}')
    for i, t in enumerate(tests):
        keys = set(t) if isinstance(t, dict) else None
        if keys not in _TEST_KEYS or not all(isinstance(v, str) for v in t.values()):
            raise InputError(
                f'--tests {path}: test {i} must be {{"stdin": str, "stdout": str}} (stdin optional) '
                f'or {{"assert": str}}, got {t!r:.80}'
            )
    return tests


def _emit(result: RewardResult) -> None:
    print(json.dumps({"score": result.score, "components": result.components, "error": result.error}))


def score_math(response: str, answer: str, timeout_s: float) -> RewardResult:
    """The accuracy reward of one response, in a worker process killed at `timeout_s`."""
    from r1_megatron.reward.math_reward import math_reward
    from r1_megatron.reward.pool import RewardPool

    with RewardPool(num_workers=1, timeout_s=timeout_s, scorer=math_reward) as pool:
        return pool.score([(response, answer)])[0]


def _math(args: argparse.Namespace) -> RewardResult:
    if (args.response is None) == (args.response_file is None):
        raise InputError("give exactly one of --response TEXT or --response-file FILE")
    response = args.response
    if response is None:
        response = _read_text(args.response_file, "--response-file")
    return score_math(response, args.answer, args.timeout)


def _code(args: argparse.Namespace) -> RewardResult:
    program = _read_text(args.program, "--program")
    tests = load_tests(args.tests)
    from r1_megatron.reward.code import score_program

    return score_program(program, tests, None, mode=args.mode)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1m reward", description="score one response or program")
    sub = parser.add_subparsers(dest="kind", required=True)
    m = sub.add_parser("math", help="accuracy of a math response against a ground-truth answer")
    m.add_argument("--response", help="the model's response text")
    m.add_argument("--response-file", help="a file holding the response text")
    m.add_argument("--answer", required=True, help="the ground-truth answer")
    m.add_argument("--timeout", type=float, default=10.0, help="hard timeout in seconds (default 10)")
    m.set_defaults(run=_math)
    c = sub.add_parser("code", help="fraction of tests a program passes in the sandbox")
    c.add_argument("--program", required=True, help="a Python source file")
    c.add_argument("--tests", required=True, help='JSON: [{"stdin","stdout"} | {"assert"}, ...]')
    c.add_argument("--mode", choices=["fraction", "all"], default="fraction", help="fraction or all")
    c.set_defaults(run=_code)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = args.run(args)
    except InputError as e:
        print(f"r1m reward {args.kind}: {e}", file=sys.stderr)
        return 2
    _emit(result)
    return 0

"""The code reward extracts the right block, judges stdin/stdout and assert tests by hand-computed
expectations, gives the exact fraction (or all-or-nothing), zeroes a sandbox violation with its typed
reason, refuses the early-exit trick on assert tests, and runs all tests of a program in one sandbox.

The programs run for real in the sandbox (whatever level the host offers).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from r1_megatron.config.schema import SandboxConfig
from r1_megatron.reward import code, registry, sandbox
from r1_megatron.reward.code import code_reward, extract_code, normalize_output, score_program

CFG = SandboxConfig(wall_seconds=3.0, cpu_seconds=2, memory_mb=256, max_processes=16, max_output_bytes=65536)

# a + b, but wrong for negative numbers (it adds absolute values).
ABS_ADD = "a, b = map(int, input().split())\nprint(abs(a) + abs(b))\n"
ADD_TESTS = [
    {"stdin": "1 2\n", "stdout": "3\n"},
    {"stdin": "10 20", "stdout": "30"},
    {"stdin": "-1 5\n", "stdout": "4\n"},
    {"stdin": "0 0\n", "stdout": "0"},
    {"stdin": "-3 -4\n", "stdout": "-7\n"},
]


def test_extract_code_takes_the_last_python_block_of_the_answer():
    response = (
        "<think>draft\n```python\nprint('draft')\n```\n</think>\n"
        "Here:\n```python\nprint(1)\n```\nand better:\n```py\nprint(2)\n```\n```text\nnot code\n```\n"
    )
    assert extract_code(response) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"  # untagged block as a fallback
    assert extract_code("```python\nx = 1\n```\n```\ny = 2\n```") == "x = 1\n"  # tagged wins
    assert extract_code("```cpp\nint main(){}\n```") is None
    assert extract_code("<think>```python\nprint(1)\n```</think> no code here") is None
    assert extract_code("```python\nprint(1)\n") is None  # never closed (truncated response)


def test_normalize_output_strips_only_trailing_whitespace_and_blank_lines():
    assert normalize_output("1 2  \r\n3\t\n\n\n") == "1 2\n3"
    assert normalize_output("  1\n\n2") == "  1\n\n2"
    assert normalize_output("1 2") != normalize_output("1  2")


def test_fraction_is_the_share_of_tests_passed():
    result = score_program(ABS_ADD, ADD_TESTS, CFG)
    # Passes 1+2, 10+20, 0+0; fails -1+5 (prints 6) and -3-4 (prints 7).
    assert (result.score, result.components, result.error) == (0.6, {"passed": 3.0, "total": 5.0}, None)
    assert score_program(ABS_ADD, ADD_TESTS, CFG, mode="all").score == 0.0
    right = "a, b = map(int, input().split())\nprint(a + b)   \n\n"
    assert score_program(right, ADD_TESTS, CFG, mode="all").score == 1.0


def test_nonzero_exit_fails_even_with_the_right_output():
    result = score_program("print(3)\nraise SystemExit(1)", [{"stdin": "", "stdout": "3"}], CFG)
    assert result.score == 0.0 and result.error is None


def test_large_stdin_reaches_the_program():
    data = "x" * (1 << 20)
    result = score_program(
        "import sys\nprint(len(sys.stdin.read()))", [{"stdin": data, "stdout": str(1 << 20)}], CFG
    )
    assert result.score == 1.0


def test_assert_tests_count_per_test():
    program = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    tests = [
        {"assert": "assert fib(10) == 55"},
        {"assert": "assert fib(1) == 1"},
        {"assert": "assert fib(5) == 6"},
    ]
    result = score_program(program, tests, CFG)
    assert result.components == {"passed": 2.0, "total": 3.0} and result.score == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "escape",
    ["exit(0)", "import sys; sys.exit()", "import os; os._exit(0)", "raise SystemExit(0)"],
)
def test_exiting_before_the_asserts_does_not_pass(escape):
    program = f"def f():\n    return 1\n{escape}\n"
    result = score_program(program, [{"assert": "assert f() == 2"}], CFG)
    assert result.score == 0.0 and result.error is None


def test_exiting_inside_the_tested_function_does_not_pass():
    program = "import os\ndef f():\n    os._exit(0)\n"
    assert score_program(program, [{"assert": "assert f() == 2"}], CFG).score == 0.0


def test_a_violation_zeroes_the_reward_with_its_type():
    program = "n = int(input())\nif n == 2:\n    import time\n    time.sleep(60)\nprint(n)\n"
    tests = [{"stdin": "1", "stdout": "1"}, {"stdin": "2", "stdout": "2"}, {"stdin": "3", "stdout": "3"}]
    result = score_program(program, tests, CFG)
    assert (result.score, result.error, result.components["passed"]) == (0.0, "sandbox:timeout", 1.0)
    memory = score_program("x = ' ' * (4 << 30)", [{"assert": "assert True"}], CFG)
    assert (memory.score, memory.error) == (0.0, "sandbox:memory")


def test_registered_component_reads_ground_truth_and_response():
    assert registry.get("code") is code_reward
    response = "<think>sum them</think>\n```python\nprint(sum(map(int, input().split())))\n```"
    truth = {"tests": ADD_TESTS}
    assert code_reward(response, truth).score == 1.0
    assert code_reward(response, json.dumps(truth)).score == 1.0
    missing = code_reward("I would write a loop.", truth)
    assert (missing.score, missing.error, missing.components) == (
        0.0,
        "no_code",
        {"passed": 0.0, "total": 5.0},
    )


def test_configure_sets_mode_and_limits_for_the_component(monkeypatch):
    monkeypatch.setattr(code, "_defaults", dict(code._defaults))
    code.configure(CFG, mode="all")
    response = "```python\n" + ABS_ADD + "```"
    assert code_reward(response, {"tests": ADD_TESTS}).score == 0.0
    with pytest.raises(ValueError, match="reward.code_mode"):
        code.configure(CFG, mode="most")


@pytest.mark.parametrize(
    "tests, where",
    [
        ([], "code tests: expected a non-empty list"),
        ([{"stdin": "1", "stdout": "1"}, {"input": "1", "output": "1"}], r"code tests\[1\]"),
        ([{"stdin": "1"}], r"code tests\[0\]"),
        ([{"assert": 3}], r"code tests\[0\]"),
    ],
)
def test_bad_tests_name_the_item(tests, where):
    with pytest.raises(ValueError, match=where):
        score_program("print(1)", tests, CFG)


def test_bad_ground_truth_is_a_clear_error():
    with pytest.raises(ValueError, match="ground_truth must be a dict with 'tests'"):
        code_reward("```python\nprint(1)\n```", {"cases": []})


def test_all_tests_of_a_program_share_one_sandbox(monkeypatch):
    starts = []
    real_popen = subprocess.Popen

    def counting_popen(*args, **kwargs):
        starts.append(args[0][0])
        return real_popen(*args, **kwargs)

    sandbox.isolation_level(CFG)  # probe first, so only the scoring run below is counted
    monkeypatch.setattr(sandbox.subprocess, "Popen", counting_popen)
    tests = [{"stdin": f"{i} {i}", "stdout": str(2 * i)} for i in range(20)]
    result = score_program("a, b = map(int, input().split())\nprint(a + b)", tests, CFG)
    assert result.score == 1.0 and len(starts) == 1

"""`r1m reward` run as a subprocess prints exactly one JSON line {"score", "components", "error"} and
exits 0; a pathological math answer is killed at --timeout and reported as error "timeout"; missing or
malformed files exit 2 with one line naming the file and the problem. The code subcommand scores a
program through reward/code.py's sandbox (it needs that module)."""

import json
import subprocess
import sys
import time

import pytest


def r1m(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "r1_megatron.cli", "reward", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"score", "components", "error"}
    return out


def test_math_right_and_wrong(tmp_path):
    out = _json(r1m("math", "--response", r"so the answer is \boxed{\frac{1}{2}}", "--answer", "0.5"))
    assert out == {"score": 1.0, "components": {"accuracy": 1.0, "answer_found": 1.0}, "error": None}
    response = tmp_path / "response.txt"
    response.write_text("<think>3 + 4 = 8?</think><answer>8</answer>")
    out = _json(r1m("math", "--response-file", str(response), "--answer", "7"))
    assert (out["score"], out["error"]) == (0.0, None)


def test_math_timeout_is_reported():
    t0 = time.monotonic()
    out = _json(r1m("math", "--response", r"\boxed{9^{9^{9^{9}}}}", "--answer", "1", "--timeout", "1"))
    assert out == {"score": 0.0, "components": {}, "error": "timeout"}
    assert time.monotonic() - t0 < 30


def test_math_bad_input_exits_2(tmp_path):
    proc = r1m("math", "--response-file", str(tmp_path / "missing.txt"), "--answer", "1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"r1m reward math: --response-file {tmp_path / 'missing.txt'}: no such file"
    proc = r1m("math", "--answer", "1")
    assert proc.returncode == 2 and "exactly one of --response" in proc.stderr


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"stdin": "1"', "invalid JSON at line 1 column 15"),
        ("[]", "expected a non-empty list of tests"),
        ('[{"stdin": "1\\n", "stdout": "1\\n"}, {"input": "2"}]', "test 1 must be"),
        ('{"tests": "print(1)"}', "expected a non-empty list of tests"),
    ],
)
def test_code_bad_tests_file_exits_2(tmp_path, content, message):
    program = tmp_path / "p.py"
    program.write_text("print(input())\n")
    tests = tmp_path / "tests.json"
    tests.write_text(content)
    proc = r1m("code", "--program", str(program), "--tests", str(tests))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"r1m reward code: --tests {tests}: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_code_missing_program_exits_2(tmp_path):
    tests = tmp_path / "tests.json"
    tests.write_text('[{"assert": "assert True"}]')
    proc = r1m("code", "--program", str(tmp_path / "nope.py"), "--tests", str(tests))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"r1m reward code: --program {tmp_path / 'nope.py'}: no such file"


def test_code_scores_a_program(tmp_path):
    program = tmp_path / "add.py"
    program.write_text("a, b = map(int, input().split())\nprint(a + b)\n")
    tests = tmp_path / "tests.json"
    # The second expected output is wrong on purpose: 1 of 2 tests passes.
    cases = [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "2 2\n", "stdout": "5\n"}]
    tests.write_text(json.dumps({"tests": cases}))
    out = _json(r1m("code", "--program", str(program), "--tests", str(tests)))
    assert out["score"] == 0.5 and out["error"] is None
    out = _json(r1m("code", "--program", str(program), "--tests", str(tests), "--mode", "all"))
    assert out["score"] == 0.0

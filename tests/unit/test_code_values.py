"""Assert-style code tests are judged by value outside the sandbox (reward/assert_values.py), so they
cannot be gamed by a result object that lies about itself.

- A result whose __eq__ claims equality with everything, one with a lying __repr__ / __hash__ / __bool__,
  a subclass of int overriding __eq__, and such an object hidden in a list or a dict all score 0 with
  error "untrusted_result" (never a silent 0), on tests they would pass if judged inside the sandbox
  (the negative control runs the same tests the old way, through the sandbox alone, and they pass).
- Honest programs score as they do when every assert runs in the sandbox: right and wrong answers over
  equality, tolerance, truth, membership, subscripts, setup statements, generators and containers.
- What stays inside the sandbox: setup statements and asserts the evaluator cannot take apart. There
  every value an assert judges must be plain data too: an always-equal result scores 0 with
  "untrusted_result" through a comprehension, a loop, a loop variable, a helper `check(f)`, a method,
  `map` with a lambda, an iterator of liars, a function that rebinds its own name after an honest first
  call, and a program that shadows or patches `all`, `range` and `type` (each passes when the same test
  runs unguarded, the negative control). Honest programs with such asserts score as python judges them
  (in the table below), infinite generators included. A lambda in an assert (a `key=` function) is the
  test's own code, judged inside, never a value to report (it crashed the split).
- stdin/stdout tests are untouched by all this.
"""

from __future__ import annotations

import pytest

from r1_megatron.config.schema import SandboxConfig
from r1_megatron.reward import assert_values
from r1_megatron.reward.code import score_program
from r1_megatron.reward.sandbox import run_tests
from r1_megatron.reward.sandbox_runner import VOUCH

CFG = SandboxConfig(wall_seconds=3.0, cpu_seconds=2, memory_mb=256, max_processes=16, max_output_bytes=65536)

LIARS = {
    "eq_everything": "class R:\n    def __eq__(self, other): return True\n    __hash__ = object.__hash__\n",
    "repr_and_hash": (
        "class R:\n    def __repr__(self): return '4'\n    def __hash__(self): return hash(4)\n"
        "    def __eq__(self, other): return True\n    def __bool__(self): return True\n"
        "    def __sub__(self, other): return 0\n    def __float__(self): return 4.0\n"
    ),
    "int_subclass": "class R(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n",
    "in_a_list": "class _L:\n    def __eq__(self, other): return True\nR = lambda: [_L(), 1]\n",
    "dict_subclass": "class R(dict):\n    def __eq__(self, other): return True\n",
}
# Tests a lying result passes when the asserts run in the sandbox (the old way).
GAMEABLE = [{"assert": t} for t in ("assert f(2) == 4", "assert f(3) == [9]", "assert f(1) == {'a': 1}")]


@pytest.mark.parametrize("name", sorted(LIARS))
def test_lying_results_score_zero_with_their_reason(name):
    program = LIARS[name] + "def f(x):\n    return R()\n"
    tests = [{"assert": "assert f(3) == [9, 1]"}] if name == "in_a_list" else GAMEABLE
    inside = run_tests(program, tests, CFG)  # negative control: judged inside, the lie works
    assert inside.violation is None and all(t.completed for t in inside.tests)
    result = score_program(program, tests, CFG)
    assert (result.score, result.error) == (0.0, "untrusted_result")


LIAR = LIARS["eq_everything"] + "def f(x):\n    return R()\n"
COMPREHENSION = "assert all(f(i) == 2 * i for i in range(3))"
LOOP = "for i in range(3):\n    assert f(i) == i + 1"
# (program, tests) that a lying result passes when the asserts run unguarded in the sandbox.
JUDGED_INSIDE = {
    "comprehension": (LIAR, [COMPREHENSION]),
    "loop": (LIAR, [LOOP]),
    "loop_variable": (LIAR, ["for i in range(3):\n    y = f(i)\n    assert y == i + 1"]),
    "helper": (LIAR, ["def check(candidate):\n    assert candidate(2) == 4\ncheck(f)"]),
    "method": (LIARS["eq_everything"] + "class S:\n    def f(self, i):\n        return R()\n",
               ["s = S()\nfor i in range(3):\n    assert s.f(i) == i"]),
    "map_lambda": (LIARS["eq_everything"] + "def f(n):\n    return [R() for _ in range(n)]\n",
                   ["assert all(map(lambda x: x == 2, f(3)))"]),
    "iterator": (LIARS["eq_everything"] + "def f(n):\n    return iter([R() for _ in range(n)])\n",
                 ["assert all(a == b for a, b in zip(f(2), [1, 2]))"]),
    "rebinds_itself": (LIARS["eq_everything"] + "def g(x):\n    return R()\n"
                       "def f(x):\n    global f\n    f = g\n    return 2 * x\n", [COMPREHENSION]),
    "shadows_builtins": (LIAR + "all = lambda *a: True\nrange = lambda n: []\n", [COMPREHENSION, LOOP]),
    "patches_builtins": (
        "import builtins\nbuiltins.all = lambda *a: True\nbuiltins.range = lambda *a: []\n"
        "builtins.type = lambda *a: int\n" + LIAR, [COMPREHENSION, LOOP]),
}


@pytest.mark.parametrize("name", sorted(JUDGED_INSIDE))
def test_asserts_judged_in_the_sandbox_refuse_lying_results(name):
    program, asserts = JUDGED_INSIDE[name]
    tests = [{"assert": t} for t in asserts]
    inside = run_tests(program, tests, CFG)  # negative control: unguarded, the lie works
    assert inside.violation is None and all(t.completed for t in inside.tests)
    result = score_program(program, tests, CFG)
    assert (result.score, result.error) == (0.0, "untrusted_result")


@pytest.mark.parametrize("test", [
    "assert abs(f(2) - 4) < 1e-6",
    "assert math.isclose(f(2), 4.0)",
    "assert f(2) in {4, 5}",
    "assert not f(2) != 4",
    "assert str(f(2)) == '4'",
])
def test_a_lying_result_cannot_pass_by_tolerance_membership_or_repr(test):
    program = "import math\n" + LIARS["repr_and_hash"] + "def f(x):\n    return R()\n"
    assert run_tests(program, [{"assert": "import math\n" + test}], CFG).tests[0].completed  # inside: passes
    assert score_program(program, [{"assert": test}], CFG).error == "untrusted_result"


HONEST = (
    "import math\n"
    "def sq(x):\n    return x * x\n"
    "def pairs(n):\n    return [(i, str(i)) for i in range(n)]\n"
    "def gen(n):\n    yield from range(n)\n"
    "def table(n):\n    return {i: {i, -i} for i in range(n)}\n"
    "def nothing():\n    return None\n"
    "def steps(n):\n    return range(n)\n"
    "def halve(x):\n    return x / 2\n"
    "import collections\n"
    "def counts(s):\n    return collections.Counter(s)\n"
    "def ordered(n):\n    return collections.OrderedDict((i, i) for i in range(n))\n"
    "def grouped(n):\n    out = collections.defaultdict(list)\n    for i in range(n):\n"
    "        out[i % 2].append(i)\n    return out\n"
    "def window(n):\n    return collections.deque(range(n))\n"
    "def frozen(n):\n    return frozenset(range(n))\n"
    "def raw(n):\n    return bytes(range(n))\n"
    "def cplx(a, b):\n    return complex(a, b)\n"
    "def naturals():\n    n = 0\n    while True:\n        yield n\n        n += 1\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, x):\n        self.items.append(x)\n        return len(self.items)\n"
)
# (test, passes): the verdict of python itself, running the asserts on these functions.
CASES = [
    ("assert sq(3) == 9", True),
    ("assert sq(3) == 10", False),
    ("assert 9 == sq(3)", True),
    ("assert sq(-2) == 4 and sq(0) == 0", True),
    ("assert sq(2) != 4 or sq(3) == 8", False),
    ("assert pairs(2) == [(0, '0'), (1, '1')]", True),
    ("assert pairs(2) == [[0, '0'], [1, '1']]", False),  # tuples are not lists
    ("assert table(2) == {0: {0}, 1: {1, -1}}", True),
    ("assert sum(gen(4)) == 6", True),
    ("assert list(gen(3)) == [0, 1, 2]", True),
    ("assert gen(3) != [0, 1, 2]", True),  # a generator is not a list
    ("assert list(zip(gen(2), 'ab')) == [(0, 'a'), (1, 'b')]", True),
    ("assert steps(3) == range(3)", True),
    ("assert sorted(gen(3), reverse=True) == [2, 1, 0]", True),
    ("assert math.isclose(halve(1), 0.5)", True),
    ("assert abs(halve(3) - 1.4) < 0.2", True),
    ("assert abs(halve(3) - 1.4) < 0.05", False),
    ("assert halve(2) == 1", True),  # 1.0 == 1, as in python
    ("assert nothing() is None", True),
    ("assert list(gen(0)) == [] and table(0) == {} and pairs(0) != ()", True),
    ("assert not nothing()", True),
    ("assert sq(2)", True),
    ("assert not sq(0) and sq(1)", True),
    ("assert pairs(3)[1][1] == '1'", True),
    ("assert pairs(3)[-2:] == [(1, '1'), (2, '2')]", True),
    ("assert len(pairs(5)) == 5", True),
    ("assert isinstance(sq(2), int)", True),
    ("assert isinstance(halve(2), int)", False),
    ("assert 4 in [sq(2), 5]", True),
    ("assert sq(2) == sq(-2)", True),
    ("x = 7\ny = sq(x)\nassert y == 49\nassert sq(x) - 1 == 48", True),
    ("assert all(sq(i) == i * i for i in range(4))", True),  # runs inside: a comprehension
    ("assert sq(2) == 4\nassert sq(3) == 0", False),
    ("assert float('inf') > sq(10 ** 5)", True),
    # the standard library's containers and bytes compare as python compares them
    ("assert counts('aab') == {'a': 2, 'b': 1}", True),
    ("assert counts('aab') == {'a': 1, 'b': 2}", False),
    ("assert ordered(2) == {1: 1, 0: 0}", True),
    ("assert grouped(3) == {0: [0, 2], 1: [1]}", True),
    ("assert window(3) == [0, 1, 2]", False),  # a deque is not a list
    ("assert list(window(3)) == [0, 1, 2]", True),
    ("assert frozen(3) == {0, 1, 2}", True),
    ("assert raw(3) == b'\\x00\\x01\\x02'", True),
    ("assert raw(2) == b'ab'", False),
    ("assert cplx(1, 2) == 1 + 2j", True),
    ("assert cplx(0, 1) ** 2 == -1", True),
    # asserts judged inside the sandbox (loops, helpers, comprehensions), every judged value checked there
    ("for i in range(4):\n    assert sq(i) == i * i", True),
    ("for i in range(4):\n    assert sq(i) == i + i", False),
    ("for i, v in enumerate(gen(3)):\n    y = sq(v)\n    assert y == i * i", True),
    ("x = 0\nwhile x < 3:\n    assert sq(x) >= x\n    x += 1", True),
    ("def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-3) == 9\ncheck(sq)", True),
    ("def check(candidate):\n    assert candidate(3) == 6\ncheck(sq)", False),
    ("assert any(sq(i) == 5 for i in range(4))", False),
    ("assert all(abs(halve(i) - i / 2) < 1e-9 for i in range(3))", True),
    ("assert [p for p in pairs(3) if p[0]] == [(1, '1'), (2, '2')]", True),
    ("assert all(map(lambda x: x >= 0, gen(3)))", True),
    ("assert max(range(4), key=lambda i: sq(i - 2)) == 0", True),  # a lambda next to a builtin
    ("assert sorted(pairs(3), key=lambda p: -p[0])[0] == (2, '2')", True),
    ("assert all(map(lambda x: x > 0, gen(3)))", False),
    ("assert all(a == b for a, b in zip(naturals(), range(5)))", True),  # read lazily, as python does
    ("assert all(cplx(i, 1) != i for i in range(3))", True),
    ("s = Stack()\nassert all(s.push(i) == i + 1 for i in range(3)) and s.items == [0, 1, 2]", True),
    ("s = Stack()\nfor i in range(3):\n    assert s.push(i) == i", False),
]


def test_honest_programs_score_as_python_judges_them():
    tests = [{"assert": t} for t, _ in CASES]
    result = score_program(HONEST, tests, CFG)
    inside = run_tests(HONEST, [{"assert": "import math\n" + t} for t, _ in CASES], CFG)
    want = [ok for _, ok in CASES]
    assert [t.completed for t in inside.tests] == want  # the table is python's own verdict
    assert result.error is None
    assert result.components == {"passed": float(sum(want)), "total": float(len(want))}
    each = [score_program(HONEST, [test], CFG).score for test in tests]
    assert each == [float(ok) for ok in want]


def test_the_split_keeps_expected_values_out_of_the_sandbox():
    plan = assert_values.plan("x = [3, 1]\nassert sorted(f(x)) == [1, 3]\nassert abs(g(2) - 3.14) < 1e-6")
    assert plan.steps == [["exec", "x = [3, 1]"], ["probe", ["f(x)"]], ["probe", ["g(2)"]]]
    sent = repr(plan.steps)
    assert "[1, 3]" not in sent and "3.14" not in sent
    assert assert_values.plan("assert f(0) == []").steps == [["probe", ["f(0)"]]]
    # A comprehension next to an expected value cannot be taken apart: it runs inside, each value it
    # judges checked there.
    [(kind, source)] = assert_values.plan("assert all(f(i) == i for i in range(3))").steps
    assert kind == "exec" and f"{VOUCH!r}(f(i))" in source
    assert assert_values.plan("x = [3, 1]").steps == [["exec", "x = [3, 1]"]]  # nothing judged: unchanged


def test_output_and_stdin_tests_are_unchanged():
    program = "import sys\ndata = sys.stdin.read()\nif data:\n    print(int(data) ** 2)\n"
    program += "def sq(x):\n    return x * x\n"
    tests = [{"stdin": "3", "stdout": "9"}, {"stdin": "4", "stdout": "15"}, {"assert": "assert sq(5) == 25"}]
    result = score_program(program, tests, CFG)
    assert (result.score, result.error) == (pytest.approx(2 / 3), None)


def test_forged_probe_lines_do_not_pass():
    # The program prints lines shaped like probe reports (it cannot know the marker, nor the expected value).
    program = "import sys\nsys.stdout.write('\\nx=[4]\\n')\ndef f(x):\n    return 5\n"
    assert score_program(program, [{"assert": "assert f(2) == 4"}], CFG).score == 0.0


def test_values_that_would_blow_up_out_here_fail_the_test():
    program = "def f(x):\n    return 10 ** 12\n"
    tests = [{"assert": "assert 'a' * f(1) == 'b'"}, {"assert": "assert f(1) ** 2 ** 40 == 1"}]
    result = score_program(program, tests, CFG)  # neither 10 ** 12 characters nor a 2 ** 46-bit power
    assert (result.score, result.error) == (0.0, None)

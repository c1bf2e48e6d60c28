"""Assert-style code tests judged by value, outside the sandbox (docs/grpo.md#rewards).

An assert test is python run after the candidate's program. Run as is, it lets the candidate's objects
judge themselves: a result whose `__eq__` always returns True passes `assert f(2) == 4`. So each
top-level `assert` is split here, before anything runs:
- probes: the sub-expressions that hold no expected value and no judgement, such as `f(2)`, `x` or
  `f([3, 1, 2]).count(1)` (arguments of the candidate's calls are its inputs). They are evaluated in the
  sandbox, and their values leave it serialized (`encode`, in sandbox_runner.py), as plain data only:
  int, float, complex, str, bytes, bool, None, and list, tuple, dict, set, frozenset, and the standard
  library's OrderedDict, Counter, defaultdict (rebuilt as a dict) and deque of those, exact types (no
  subclasses); also a range, and a built-in iterator (a generator, map, ...) as its items. Nothing of
  the result object runs for that: no `__eq__`, `__hash__`, `__repr__`, `__len__` or `__bool__`.
- the rest, with the expected values (literals, type names), every comparison and truth test, and the
  builtins applied to results (`str`, `len`, `sorted`, `sum`, `abs`, `round`, `math.isclose`, ...),
  is evaluated out here on the decoded plain values.
A probe value that is not plain data makes the test `untrusted`; code.py then scores the program 0 with
error "untrusted_result". Expected values never enter the sandbox, so code that subverts the sandbox's
serializer can only report values it chose without seeing them.

Left to run inside: other statements (setup such as `x = [1, 2]`, loops, calls like `check(f)`), and
asserts this evaluator cannot take apart (a comprehension or lambda next to an expected value, e.g.
`assert all(f(i) == 2 * i for i in range(3))`). A probe that names a setup variable reads it inside
the sandbox. The asserts among them are rewritten (`judged`) so that the sandbox checks each value they
judge (each operand of a comparison, truth test or arithmetic, each argument of a builtin applied to a
result): it must be plain data as above, decided by the same `encode`, or the test is untrusted. The
check sits at the assert, not on the candidate's functions, so it holds wherever the value came from: a
method, a name the program rebinds while the asserts run, a variable set earlier in a loop. The
builtins the test names (`all`, `range`, `len`, ...) are the real ones, taken before the program runs,
unless the test binds the name itself.
What stays open inside: a judgement written without `assert` (`if f(2) != 4: raise ...`), and code
that attacks the harness rather than lying through a value (code.py's known limit).
"""

from __future__ import annotations

import ast
import collections
import json
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from r1_megatron.reward.sandbox_runner import BUILTIN, VOUCH

Values = list[Any]
_Eval = Callable[[Values], Any]

_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos,
}
_CALLS: dict[str, Callable] = {
    f.__name__: f
    for f in (int, float, str, bool, list, tuple, dict, set, abs, round, len, min, max, sum, sorted,
              reversed, enumerate, zip, any, all, isinstance, type)
}
_MATH = {f.__name__: f for f in (math.isclose, math.isnan, math.isinf, math.fabs, math.sqrt)}
# Builtins a judged assert in the sandbox uses in their real form: those applied to results out here,
# and those that drive the loops and comprehensions the asserts sit in.
_REAL = frozenset(_CALLS) | {"range", "iter", "next", "map", "filter", "repr", "hash", "frozenset", "bytes",
                             "complex"}
_FUNCTION_FIRST = {"map", "filter"}  # their first argument is a function, not a judged value
# Bounds on what the candidate's values can make out here (the reward pool's timeout is the backstop).
_MAX_ITEMS = 1_000_000  # a sequence repeated out here (`[0] * n`) stays below this many items
_MAX_POWER_BITS = 1 << 20  # an integer power stays below about this many bits


def _times(a: Any, b: Any) -> Any:
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > _MAX_ITEMS:
            raise ValueError(f"a repeated sequence of {len(seq)} x {n} items")
    return a * b


def _power(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and a.bit_length() * abs(b) > _MAX_POWER_BITS:
        raise ValueError(f"an integer power of {a.bit_length()} bits with exponent {b}")
    return a**b


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _times, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power,
}


class Untrusted(Exception):
    """A probe value that is not plain data (its type name is the message)."""


class _Unsupported(Exception):
    """An assert this evaluator cannot take apart: it runs inside the sandbox as written."""


@dataclass
class AssertPlan:
    """How one assert test runs: `steps` for the sandbox runner, in order: ["exec", source] runs as
    python, ["probe", [expression, ...]] reports the expressions' values. `checks[i]` judges the i-th
    probe step from those values."""

    steps: list[list] = field(default_factory=list)
    checks: list[_Eval] = field(default_factory=list)

    def verdict(self, reported: list[str]) -> bool:
        """True when every value-checked assert holds. `reported`: one JSON line per probe step.
        Raises Untrusted when a probe value is not plain data."""
        if len(reported) != len(self.checks):
            return False
        for line, check in zip(reported, self.checks, strict=True):
            values = [decode(v) for v in json.loads(line)]
            try:
                if not check(values):
                    return False
            except Exception:  # noqa: BLE001 - a TypeError etc. on the candidate's values fails the assert
                return False
        return True


def plan(code: str) -> AssertPlan:
    """Split an assert test into sandbox steps and outside checks (module docstring)."""
    out = AssertPlan()
    try:
        tree = ast.parse(code)
    except SyntaxError:
        out.steps.append(["exec", code])  # fails inside, as python would
        return out
    for stmt in tree.body:
        source = ast.get_source_segment(code, stmt) or ast.unparse(stmt)
        if isinstance(stmt, ast.Assert):
            probes: list[str] = []
            try:
                check = _outside(stmt.test, probes)
            except _Unsupported:
                check = None
            if check is not None:
                out.steps.append(["probe", probes])
                out.checks.append(check)
                continue
        if out.steps and out.steps[-1][0] == "exec":
            out.steps[-1][1] += "\n" + source
        else:
            out.steps.append(["exec", source])
    for step in out.steps:
        if step[0] == "exec":
            step[1] = judged(step[1])
    return out


def judged(source: str) -> str:
    """`source`, python run in the sandbox, with each value its asserts judge wrapped in the sandbox's
    check (VOUCH) and the builtins it names replaced by the real ones (BUILTIN + name); unchanged when
    there is nothing to wrap (module docstring)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source  # fails inside, as python would
    before = ast.dump(tree)
    bound = _bound_names(tree)
    tree = _Builtins(bound).visit(_Judge(bound).visit(tree))
    return source if ast.dump(tree) == before else ast.unparse(tree)


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the test binds itself (assigned, defined, imported, a parameter)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


# Where an assert judges a value: comparisons, truth tests and arithmetic.
_JUDGED_FIELDS: dict[type, tuple[str, ...]] = {
    ast.Compare: ("left", "comparators"), ast.BoolOp: ("values",), ast.UnaryOp: ("operand",),
    ast.BinOp: ("left", "right"), ast.IfExp: ("test",), ast.comprehension: ("ifs",),
}


class _Judge(ast.NodeTransformer):
    """Inside each assert: wraps every judged value in VOUCH. The arguments of the candidate's own calls
    are its inputs and stay as they are, as do the receivers of its methods."""

    def __init__(self, bound: set[str]) -> None:
        self.bound, self.inside = bound, False

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        self.inside = True
        node.test = self._value(self.visit(node.test))
        self.inside = False
        return node

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        if not self.inside:
            return node
        for name in _JUDGED_FIELDS.get(type(node), ()):
            value = getattr(node, name)
            judged = [self._value(v) for v in value] if isinstance(value, list) else self._value(value)
            setattr(node, name, judged)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if self.inside and self._real(node.func):
            first = 1 if node.func.id in _FUNCTION_FIRST else 0
            node.args = node.args[:first] + [self._value(a) for a in node.args[first:]]
        return node

    def _real(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id in _REAL and node.id not in self.bound

    def _value(self, node: ast.expr) -> ast.expr:
        if isinstance(node, ast.Constant) or self._real(node):
            return node
        if isinstance(node, ast.Starred):
            node.value = self._value(node.value)
        elif isinstance(node, ast.List | ast.Tuple | ast.Set):
            node.elts = [self._value(e) for e in node.elts]
        elif isinstance(node, ast.Dict):
            node.keys = [k if k is None else self._value(k) for k in node.keys]
            node.values = [self._value(v) for v in node.values]
        else:
            return ast.Call(func=ast.Constant(VOUCH), args=[node], keywords=[])
        return node


class _Builtins(ast.NodeTransformer):
    """Every name of _REAL the test reads without binding it becomes BUILTIN + name."""

    def __init__(self, bound: set[str]) -> None:
        self.bound = bound

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and node.id in _REAL and node.id not in self.bound:
            return ast.Constant(BUILTIN + node.id)
        return node


_MAPPINGS = {"dict": dict, "OrderedDict": collections.OrderedDict,
             "Counter": lambda pairs: collections.Counter(dict(pairs))}


def decode(value: Any) -> Any:
    """A probe value from the sandbox's encoding back to plain data; Untrusted for a rejected one."""
    if isinstance(value, dict):
        ((tag, items),) = value.items()
        if tag == "untrusted":
            raise Untrusted(str(items))
        if tag in _MAPPINGS:
            return _MAPPINGS[tag]((decode(k), decode(v)) for k, v in items)
        if tag == "range":
            return range(*items)
        if tag == "complex":
            return complex(*items)
        kind = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "bytes": bytes,
                "deque": collections.deque, "iter": lambda x: iter(list(x))}[tag]
        return kind(decode(v) for v in items)
    return value


# ------------------------------------------------------------------------------------------------
def _exposed(node: ast.AST) -> bool:
    """Whether `node` must be evaluated out here: it holds a literal, a comparison, a truth test or a
    builtin (applied to a result, it would run the result's own methods) that is not an input of the
    candidate's own calls."""
    if isinstance(node, ast.Constant | ast.Compare | ast.BoolOp):
        return True
    empty = (isinstance(node, ast.List | ast.Tuple | ast.Set) and not node.elts) or (
        isinstance(node, ast.Dict) and not node.keys)
    if empty:
        return True  # an empty container, e.g. the expected value of `assert f(0) == []`
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return True
    if isinstance(node, ast.Lambda):
        return True  # the test's own code (a key= function, say), never a value to report
    if isinstance(node, ast.Name):
        return node.id in _CALLS
    if isinstance(node, ast.Call):
        # The arguments of the candidate's calls are inputs; a lambda that map or filter applies to its
        # results judges them (`all(map(lambda x: x == 2, f(3)))`).
        judging = isinstance(node.func, ast.Name) and node.func.id in _FUNCTION_FIRST and any(
            isinstance(a, ast.Lambda) for a in node.args)
        return judging or _is_safe_call(node) or _exposed(node.func)
    return any(_exposed(child) for child in ast.iter_child_nodes(node))


def _is_safe_call(node: ast.Call) -> bool:
    f = node.func
    if isinstance(f, ast.Name):
        return f.id in _CALLS
    math_attr = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math"
    return math_attr and f.attr in _MATH


def _outside(node: ast.AST, probes: list[str]) -> _Eval:
    """A function of the probe values that evaluates `node` out here; appends the probes it needs."""
    if not isinstance(node, ast.Slice) and not _exposed(node):
        index = len(probes)
        probes.append(ast.unparse(node))
        return lambda v: v[index]
    try:
        constant = ast.literal_eval(node)
        return lambda v: constant
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    sub = lambda n: _outside(n, probes)  # noqa: E731
    if isinstance(node, ast.Name):  # a builtin, e.g. the `int` of isinstance(f(x), int)
        builtin = _CALLS[node.id]
        return lambda v: builtin
    if isinstance(node, ast.Compare):
        left, ops = sub(node.left), [_COMPARE[type(op)] for op in node.ops]
        rights = [sub(c) for c in node.comparators]
        return lambda v: _chain(left(v), ops, [r(v) for r in rights])
    if isinstance(node, ast.BoolOp):
        parts = [sub(x) for x in node.values]
        if isinstance(node.op, ast.And):
            return lambda v: _and(parts, v)
        return lambda v: _or(parts, v)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        fn, operand = _UNARY[type(node.op)], sub(node.operand)
        return lambda v: fn(operand(v))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        fn, a, b = _BINARY[type(node.op)], sub(node.left), sub(node.right)
        return lambda v: fn(a(v), b(v))
    if isinstance(node, ast.Subscript):
        value, index = sub(node.value), sub(node.slice)
        return lambda v: value(v)[index(v)]
    if isinstance(node, ast.Slice):
        parts = [sub(x) if x is not None else (lambda v: None) for x in (node.lower, node.upper, node.step)]
        return lambda v: slice(*(p(v) for p in parts))
    # A call's arguments or a display's items (a Lambda's `args` is an ast.arguments, not a list).
    items = node.args if isinstance(node, ast.Call) else getattr(node, "elts", [])
    starred = any(isinstance(e, ast.Starred) for e in items)
    if isinstance(node, ast.List | ast.Tuple | ast.Set) and not starred:
        kind = {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)]
        items = [sub(e) for e in node.elts]
        return lambda v: kind(i(v) for i in items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        pairs = [(sub(k), sub(x)) for k, x in zip(node.keys, node.values, strict=True)]
        return lambda v: {k(v): x(v) for k, x in pairs}
    if isinstance(node, ast.Call) and _is_safe_call(node) and not starred:
        fn = _CALLS[node.func.id] if isinstance(node.func, ast.Name) else _MATH[node.func.attr]
        if any(k.arg is None for k in node.keywords):
            raise _Unsupported(ast.unparse(node))
        args, kwargs = [sub(a) for a in node.args], {k.arg: sub(k.value) for k in node.keywords}
        return lambda v: fn(*(a(v) for a in args), **{k: x(v) for k, x in kwargs.items()})
    raise _Unsupported(ast.unparse(node))


def _chain(left: Any, ops: list[Callable], rights: list[Any]) -> bool:
    for op, right in zip(ops, rights, strict=True):
        if not op(left, right):
            return False
        left = right
    return True


def _and(parts: list[_Eval], v: Values) -> Any:
    result: Any = True
    for p in parts:
        result = p(v)
        if not result:
            return result
    return result


def _or(parts: list[_Eval], v: Values) -> Any:
    result: Any = False
    for p in parts:
        result = p(v)
        if result:
            return result
    return result

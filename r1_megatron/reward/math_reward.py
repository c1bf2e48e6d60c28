"""Accuracy reward for math (docs/grpo.md): the last balanced `\\boxed{…}` (or `\\fbox{…}`), else the last
`<answer>…</answer>`, checked against the ground truth by math-verify, with sympy as the fallback.

Decisions worth knowing:
- math-verify's own timeouts use signal.alarm, which raises off the main thread (verl lost every MATH
  reward to this, silently). We call it with those timeouts disabled; the hard per-item kill of
  `RewardPool` is the timeout. Outside the pool a pathological answer can therefore run long.
- A response without an answer, or whose answer nothing can parse, scores 0 with `error=None`: that is a
  model failure, not a reward failure. An unexpected exception inside math-verify is an error
  ("parse_error", "verify_error"); a ground truth that nothing can parse is "gold_parse_error".
- The sympy fallback only runs on a restricted alphabet (digits, operators, one-letter symbols and a few
  function names): `sympy.parse_expr` evaluates Python, and the response is untrusted text.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sympy
from math_verify import parse, verify
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

from r1_megatron.reward.registry import RewardResult, register

# The warning says "timeouts are disabled, interrupt it yourself" on every process's first call; the
# pool does interrupt it, so the warning is noise in every worker's log.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
# English words of two or more letters that are not LaTeX commands: their presence means prose around
# the answer ("The answer is 42"), which math-verify's free-text extraction handles better than a box.
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
_MATH_WORDS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi", "and", "or", "cm", "m", "km", "kg"}
_SAFE_EXPR = re.compile(r"[0-9A-Za-z+\-*/^().,= ]*")
_SAFE_NAMES = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi", "oo", "E", "I"}
_MAX_SYMPY_CHARS = 200
_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor)


def _matching_braces(text: str) -> dict[int, int]:
    """Position of every '{' -> position of its '}' (one linear pass; `\\{` and `\\}` are literals)."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skips \{ \} and \\ (a line break directly before a closing brace)
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{…}` (or `\\boxed {…}`, `\\fbox{…}`, `\\boxed 5`)."""
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    pairs: dict[int, int] | None = None
    for m in reversed(matches):
        start = m.end()
        if start < len(text) and text[start] == "{":
            pairs = _matching_braces(text) if pairs is None else pairs
            if start in pairs:
                return text[start + 1 : pairs[start]]
        elif start > m.start() + len(m.group(0).rstrip()) and start < len(text):
            # `\boxed 5`: TeX boxes the next token; we take up to the next space or math delimiter.
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                return token.group(0)
    return None


def extract_answer(response: str) -> str | None:
    """The final answer: last balanced box, else the last `<answer>…</answer>`; None if absent or empty."""
    boxed = extract_boxed(response)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    end = response.rfind(_ANSWER_CLOSE)
    if end < 0:
        return None
    start = response.rfind(_ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    inner = response[start + len(_ANSWER_OPEN) : end].strip()
    if not inner:
        return None
    # An <answer> that itself holds a box (the R1-Zero template plus a boxing habit) was handled above.
    return inner


def _is_prose(answer: str) -> bool:
    stripped = re.sub(r"\\text\{[^{}]*\}", " ", answer)
    words = [w for w in _PROSE_WORD.findall(stripped) if w.lower() not in _MATH_WORDS]
    return len(words) >= 2


def _mv_parse(text: str) -> list:
    return parse(text, parsing_timeout=None, raise_on_error=True)


def _parse_pred(answer: str) -> list:
    """math-verify's parse of an extracted answer: boxed when it is pure math, free text when prose."""
    if "$" in answer or _is_prose(answer):
        parsed = _mv_parse(answer)
        if parsed:
            return parsed
    return _mv_parse("\\boxed{" + answer + "}")


def _parse_gold(gold: str) -> list:
    if "$" in gold or "\\boxed" in gold:
        return _mv_parse(gold)
    return _mv_parse("\\boxed{" + gold + "}")


def _has_sympy(parsed: list) -> bool:
    return any(isinstance(x, (sympy.Basic, sympy.MatrixBase)) for x in parsed)


def _sympy_parse(text: str) -> Any | None:
    """sympy's own parser on a plain expression, refusing anything outside a safe alphabet."""
    text = text.strip().rstrip(".").replace("\\cdot", "*").replace("\\times", "*")
    if not text or len(text) > _MAX_SYMPY_CHARS or not _SAFE_EXPR.fullmatch(text):
        return None
    if any(len(name) > 1 and name not in _SAFE_NAMES for name in re.findall(r"[A-Za-z]+", text)):
        return None
    try:
        return parse_expr(text, transformations=_TRANSFORMS)
    except Exception:  # any parse failure means "sympy cannot read this", not a reward error
        return None


def sympy_equal(gold: str, pred: str) -> bool | None:
    """True/False when sympy can read both sides, None when it cannot."""
    g, p = _sympy_parse(gold), _sympy_parse(pred)
    if g is None or p is None:
        return None
    try:
        return bool(sympy.simplify(g - p) == 0)
    except Exception:
        return bool(g == p)


def _normalize(text: str) -> str:
    return re.sub(r"\s+|\$|\\[,!;: ]", "", text).rstrip(".").lower()


def check_answer(answer: str, gold: str) -> tuple[bool, str | None]:
    """(correct, error type or None) for an extracted answer against the ground truth."""
    try:
        gold_mv = _parse_gold(gold)
    except Exception:  # math-verify raised where it should have returned: a gold it chokes on
        gold_mv = []
    try:
        pred_mv = _parse_pred(answer)
    except Exception:
        return False, "parse_error"
    verify_failed = False
    if _has_sympy(gold_mv) and _has_sympy(pred_mv):
        try:
            return bool(verify(gold_mv, pred_mv, timeout_seconds=None, raise_on_error=True)), None
        except Exception:
            verify_failed = True
    by_sympy = sympy_equal(gold, answer)
    if by_sympy is not None:
        return by_sympy, None
    if _normalize(gold) == _normalize(answer):
        return True, None
    if not gold_mv and _sympy_parse(gold) is None:
        return False, "gold_parse_error"
    if verify_failed:
        return False, "verify_error"
    return False, None


@register("accuracy")
def math_reward(response: str, ground_truth: Any) -> RewardResult:
    """1 if the response's final answer equals `ground_truth` (a string or number), else 0."""
    answer = extract_answer(response)
    if answer is None:
        return RewardResult(0.0, {"accuracy": 0.0, "answer_found": 0.0})
    try:
        ok, error = check_answer(answer, str(ground_truth))
    except RecursionError:
        ok, error = False, "parse_error"
    score = 1.0 if ok else 0.0
    return RewardResult(score, {"accuracy": score, "answer_found": 1.0}, error)

"""Decontamination: drop training prompts that share a word 10-gram with any eval prompt.

Text is normalized before comparison: NFKC, lower case, punctuation and symbols turned into spaces,
whitespace collapsed. Words are whitespace-separated runs, with two exceptions: each CJK character
counts as one word (Chinese has no spaces, so a sentence would otherwise be one "word"), and the math
operators ``+ - * / = ^ < > %`` are kept as words (else "3 + 4" and "3 - 4" would be the same text).
A prompt with fewer than n words contributes one gram, all of its words, so a short prompt is
caught when it is repeated verbatim (after normalization).

Compare the *questions*, not templated prompts: a shared template is itself longer than 10 words
(and so is a fixed instruction inside a question, as in the countdown task: dedupe those by key).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

_OPERATORS = frozenset("+-*/=^<>%")
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")


def normalize_words(text: str) -> list[str]:
    """Lower-cased words without punctuation; each CJK character and math operator is its own word."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(f" {ch} " if ch in _OPERATORS else " " if unicodedata.category(ch)[0] in "PS" else ch
                   for ch in text)
    return _CJK.sub(r" \1 ", text).split()


def ngrams(text: str, n: int = 10) -> set[tuple[str, ...]]:
    """The word n-grams of `text` (one gram of all its words when it has fewer than n)."""
    words = normalize_words(text)
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def decontaminate(train: Sequence[dict], eval_texts: Iterable[str], *, n: int = 10,
                  key: str = "prompt") -> tuple[list[dict], dict[str, int]]:
    """Keep the training items whose `key` text shares no n-gram with any eval text.

    Returns (kept items in input order, {"total", "kept", "dropped", "eval_ngrams"}).
    """
    if n < 1:
        raise ValueError(f"decontaminate: n must be >= 1, got {n}")
    banned: set[tuple[str, ...]] = set()
    for text in eval_texts:
        banned |= ngrams(text, n)
    kept = []
    for k, item in enumerate(train):
        if key not in item or not isinstance(item[key], str):
            raise ValueError(f"decontaminate: training item {k} has no string field '{key}'")
        if banned.isdisjoint(ngrams(item[key], n)):
            kept.append(item)
    counts = {"total": len(train), "kept": len(kept), "dropped": len(train) - len(kept),
              "eval_ngrams": len(banned)}
    return kept, counts

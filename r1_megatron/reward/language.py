"""Language-consistency reward (docs/grpo.md, DeepSeek-R1 §2.3.3): the share of the chain-of-thought's words
that are written in the target language's script, in [0, 1].

How words are counted (by Unicode script, no model, no network):
- the chain of thought is the think block (text before "</think>", without a leading "<think>"); a
  response with no "</think>" is all chain of thought;
- math is not language: `$…$`, `$$…$$`, `\\(…\\)`, `\\[…\\]` and LaTeX commands are dropped first;
- each Han or kana character is one word (Chinese and Japanese do not separate words by spaces), any
  other run of letters is one word, classified by the script of its first letter; digits and symbols
  are not words.
A chain of thought with no words scores 0: there is nothing consistent to reward, and an empty think
block must not earn this reward.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from r1_megatron.reward.format_reward import THINK_CLOSE, THINK_OPEN
from r1_megatron.reward.registry import RewardResult, register

# target language -> the scripts its words are written in
SCRIPTS: dict[str, frozenset[str]] = {
    **{lang: frozenset({"latin"}) for lang in ("en", "fr", "de", "es", "it", "pt", "nl", "vi", "id")},
    "zh": frozenset({"han"}),
    "ja": frozenset({"han", "kana"}),
    "ko": frozenset({"hangul"}),
    "ru": frozenset({"cyrillic"}),
    "el": frozenset({"greek"}),
}

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_KANA = "\u3040-\u30ff\u31f0-\u31ff"
_WORD = re.compile(f"[{_HAN}]|[{_KANA}]|[^\\W\\d_{_HAN}{_KANA}]+")
_MATH = re.compile(r"\$\$.*?\$\$|\$.*?\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+", re.S)


def chain_of_thought(response: str) -> str:
    """The reasoning part of a response (see the module docstring)."""
    body = response.lstrip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :]
    end = body.find(THINK_CLOSE)
    return body if end < 0 else body[:end]


def word_scripts(text: str) -> list[str]:
    """The script of every word in `text` ("latin", "han", "kana", "cyrillic", ...), math removed."""
    scripts = []
    for word in _WORD.findall(_MATH.sub(" ", text)):
        c = word[0]
        if re.match(f"[{_HAN}]", c):
            scripts.append("han")
        elif re.match(f"[{_KANA}]", c):
            scripts.append("kana")
        else:
            scripts.append(unicodedata.name(c, "UNKNOWN").split()[0].lower())
    return scripts


def language_share(text: str, language: str) -> float:
    """Share of the words of `text` in `language`'s script; 0.0 when there are no words."""
    if language not in SCRIPTS:
        raise ValueError(f"reward.language: unknown language {language!r}; known: {sorted(SCRIPTS)}")
    scripts = word_scripts(text)
    if not scripts:
        return 0.0
    target = SCRIPTS[language]
    return sum(s in target for s in scripts) / len(scripts)


@register("language")
def language_reward(response: str, ground_truth: Any) -> RewardResult:
    """Share of target-language words in the chain of thought; `ground_truth` is the language tag."""
    share = language_share(chain_of_thought(response), str(ground_truth or "en"))
    return RewardResult(share, {"language": share})

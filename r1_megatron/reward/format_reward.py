"""Format reward (docs/grpo.md): 1 when the response is exactly one `<think>…</think>` block followed by a
non-empty answer part, else 0.

Who opens the think block: the R1-Zero template (and DeepSeek-R1's chat template) end the prompt with
"<think>", so the response starts inside the block and holds only its closing tag. Other templates leave
the opening tag to the model. Both are accepted: the response may begin (after whitespace) with one
"<think>"; any other "<think>" anywhere makes it 0, as does a second "</think>".

The answer part is the text after "</think>". When it uses `<answer>` tags (the R1-Zero template), it must
be exactly one `<answer>…</answer>` with non-blank content and nothing else around it; otherwise any
non-blank text is an answer part (the readable R1 format ends with a plain summary).
"""

from __future__ import annotations

from typing import Any

from r1_megatron.reward.registry import RewardResult, register

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def split_think(response: str) -> tuple[str, str] | None:
    """(reasoning, answer part) when the response holds exactly one think block, else None."""
    body = response.lstrip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :]
    if THINK_OPEN in body or body.count(THINK_CLOSE) != 1:
        return None
    reasoning, answer = body.split(THINK_CLOSE)
    return reasoning, answer


def _answer_part_ok(answer: str) -> bool:
    answer = answer.strip()
    if not answer:
        return False
    if ANSWER_OPEN not in answer and ANSWER_CLOSE not in answer:
        return True
    if answer.count(ANSWER_OPEN) != 1 or answer.count(ANSWER_CLOSE) != 1:
        return False
    if not (answer.startswith(ANSWER_OPEN) and answer.endswith(ANSWER_CLOSE)):
        return False
    return bool(answer[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)].strip())


@register("format")
def format_reward(response: str, ground_truth: Any = None) -> RewardResult:
    """1.0 for one think block plus a non-empty answer part, else 0.0 (the ground truth is unused)."""
    parts = split_think(response)
    score = 1.0 if parts is not None and _answer_part_ok(parts[1]) else 0.0
    return RewardResult(score, {"format": score})

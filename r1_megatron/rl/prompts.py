"""The prompt stream of a GRPO run: the built-in task generator or data.train_file, with ground truth.

Every rank draws the same prompts (the stream is deterministic), so a multi-rank run needs no
broadcast of them; `position` is what a checkpoint stores to resume the stream.
"""

from __future__ import annotations

import random
from typing import Any

from r1_megatron.config.schema import JobConfig


class PromptStream:
    """Prompts with ground truth: the built-in task generator, or data.train_file (JSONL).

    `position` counts prompts handed out; a resumed run restores it (checkpoint extra state)."""

    def __init__(self, cfg: JobConfig, tokenizer: Any, position: int = 0):
        from r1_megatron.data.chat import encode_prompt

        self.cfg, self.tokenizer, self.position = cfg, tokenizer, position
        self._encode = lambda text: encode_prompt(tokenizer, text, chat=cfg.data.chat)
        if cfg.data.train_file:
            from r1_megatron.data.jsonl import read_jsonl

            self._items, _ = read_jsonl(cfg.data.train_file, "prompt", strict=True)
        else:
            self._items = None

    def _item(self, k: int) -> dict:
        if self._items is not None:
            epoch, i = divmod(k, len(self._items))
            order = list(range(len(self._items)))
            random.Random(self.cfg.data.seed * 1_000_003 + epoch).shuffle(order)
            return self._items[order[i]]
        from r1_megatron.data.tasks import iter_items

        if not hasattr(self, "_stream"):
            self._stream, self._made = iter_items(**task_kwargs(self.cfg, "train")), []
        while len(self._made) <= k:
            self._made.append(next(self._stream))
        return self._made[k]

    def take(self, n: int) -> list[dict]:
        items = [self._item(k) for k in range(self.position, self.position + n)]
        self.position += n
        for item in items:
            item.setdefault("prompt_ids", self._encode(item["prompt"]))
        return items


def task_kwargs(cfg: JobConfig, split: str) -> dict:
    """Arguments of data.tasks.iter_items/make_items for the configured built-in task."""
    d = cfg.data
    knobs = {"digits": d.digits, "ops": tuple(d.ops), "mul_digits": d.mul_digits} if d.task == "arithmetic" else {}
    return {"task": d.task, "seed": d.seed, "split": split, "template": d.template, **knobs}


def ground_truth(item: dict) -> Any:
    """What the reward functions compare against: tests for code, numbers/target for countdown."""
    if "tests" in item:
        return {"tests": item["tests"]}
    if item.get("task") == "countdown":
        return {"answer": item["answer"], "numbers": item["numbers"], "target": item["target"]}
    return item["answer"]

"""The prompt stream of a GRPO run: the built-in task generator or data.train_file, with ground truth.

Every rank draws the same prompts (the stream is deterministic), so a multi-rank run needs no
broadcast of them; `position` is what a checkpoint stores to resume the stream.
"""

from __future__ import annotations

from typing import Any

from r1_megatron.config.schema import JobConfig
from r1_megatron.data.tasks import epoch_order, iter_items, task_kwargs


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
            return self._items[epoch_order(len(self._items), self.cfg.data.seed, epoch)[i]]
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


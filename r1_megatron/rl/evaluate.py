"""Held-out accuracy during RL: pass@1 as the mean correctness over k samples per prompt at
T = 0.6, top-p 0.95 (SPEC §8), on the task's eval split, scored by the same reward pool."""

from __future__ import annotations

from collections.abc import Callable

from r1_megatron.config.schema import JobConfig
from r1_megatron.rollout.engine import SamplingParams


def eval_items(cfg: JobConfig, tokenizer, n: int | None = None) -> list[dict]:
    from r1_megatron.data.chat import encode_prompt
    from r1_megatron.data.tasks import make_items
    from r1_megatron.rl.prompts import task_kwargs

    items = make_items(n=n or cfg.data.num_eval, **task_kwargs(cfg, "eval"))
    for item in items:
        item["prompt_ids"] = encode_prompt(tokenizer, item["prompt"], chat=cfg.data.chat)
    return items


def heldout_correct(engine, pool, tokenizer, cfg: JobConfig, n: int | None = None,
                    share: Callable[[int], list[int]] | None = None) -> list[float]:
    """The 'accuracy' reward component of each of cfg.rl.eval_samples samples per prompt, for the
    prompts `share(len(items))` picks (default: all). Each prompt's samples are seeded by its index,
    so an item scores the same whichever engine generates it. pool None: generate only, return []."""
    from r1_megatron.rl.prompts import ground_truth

    items = eval_items(cfg, tokenizer, n)
    picked = share(len(items)) if share is not None else list(range(len(items)))
    items = [items[i] for i in picked]
    sampling = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed + 7)
    prompts = [it["prompt_ids"] for it in items]
    outs = engine.generate(prompts, n=cfg.rl.eval_samples, sampling=sampling, keys=picked)
    if pool is None:
        return []
    pairs = [(tokenizer.decode(s.token_ids, skip_special_tokens=True), ground_truth(it))
             for it, gens in zip(items, outs, strict=True) for s in gens]
    return [r.components.get("accuracy", 0.0) for r in pool.score(pairs)]

"""Held-out accuracy during RL: pass@1 as the mean correctness over k samples per prompt at
T = 0.6, top-p 0.95 (SPEC §8), on the task's eval split, scored by the same reward pool."""

from __future__ import annotations

from r1_megatron.config.schema import JobConfig
from r1_megatron.rollout.engine import SamplingParams


def eval_items(cfg: JobConfig, tokenizer, n: int | None = None) -> list[dict]:
    from r1_megatron.data.chat import encode_prompt
    from r1_megatron.data.tasks import make_items
    from r1_megatron.rl.grpo import task_kwargs

    items = make_items(n=n or cfg.data.num_eval, **task_kwargs(cfg, "eval"))
    for item in items:
        item["prompt_ids"] = encode_prompt(tokenizer, item["prompt"], chat=cfg.data.chat)
    return items


def heldout_accuracy(engine, pool, tokenizer, cfg: JobConfig, n: int | None = None) -> float:
    """Mean over prompts and cfg.rl.eval_samples samples of the 'accuracy' reward component."""
    from r1_megatron.rl.grpo import ground_truth

    items = eval_items(cfg, tokenizer, n)
    sampling = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed + 7)
    outs = engine.generate([it["prompt_ids"] for it in items], n=cfg.rl.eval_samples, sampling=sampling)
    pairs = [(tokenizer.decode(s.token_ids, skip_special_tokens=True), ground_truth(it))
             for it, gens in zip(items, outs, strict=True) for s in gens]
    results = pool.score(pairs)
    return sum(r.components.get("accuracy", 0.0) for r in results) / max(len(results), 1)

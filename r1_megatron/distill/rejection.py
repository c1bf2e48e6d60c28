"""Rejection sampling (R1 stage 3 and distillation traces, docs/architecture.md): sample k responses per
prompt from a checkpoint, keep the ones the verifiers accept, mix in non-reasoning data, write SFT pairs.

    records, report = rejection_sample(engine, tokenizer, items, RejectionConfig(k=4), sampling,
                                       eval_texts=[...])
    write_jsonl("sft.jsonl", records)

The steps:
1. decontaminate: drop prompts sharing a word 10-gram with any eval prompt (data/decontam.py; the
   "question" field is compared when an item has one, else the prompt);
2. sample k responses per prompt with the RolloutEngine and check correctness in the reward pool
   (math-verify, `verify_countdown`, or the code sandbox; eval/scoring.py);
3. keep a sample only when `rejection_reasons` finds nothing wrong with it (below);
4. drop identical responses to the same prompt, and cap the samples kept per prompt if asked;
5. add non-reasoning pairs so that they make up `non_reasoning_fraction` of the output;
6. each record carries its provenance: prompt id, sample index, token count and the scores.

The filter (`rejection_reasons`, a pure function of item, text, token count, finish reason and reward):
"truncated" (the sample hit the length cap), "too_short" / "too_long" (token bounds), "reward_error"
(the check failed: timeout, crash, parse error), "wrong", "format" (not exactly one think block followed
by an answer part, format_reward) and "mixed_language" (the share of the chain of thought's words in
the target script, language.py, is below `min_language`). Every reason a sample fails is counted.

Decontamination is by text only. The built-in tasks' train and eval splits are disjoint by
construction (a hash of each question), and countdown questions share a fixed 10-word instruction, so
decontaminating countdown against countdown drops every prompt: meant for prompt files.

Departure from the language reward: a chain of thought with no words at all (e.g. "37+45=82") scores 0
there (nothing to reward), but it mixes no languages, so it is not rejected here.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

from r1_megatron.data.decontam import decontaminate
from r1_megatron.eval.scoring import Generation, generate_and_score, item_kind
from r1_megatron.reward.format_reward import format_reward
from r1_megatron.reward.language import SCRIPTS, chain_of_thought, language_share, word_scripts
from r1_megatron.reward.registry import RewardResult
from r1_megatron.rollout.engine import RolloutEngine, SamplingParams

REASONS = ("truncated", "too_short", "too_long", "reward_error", "wrong", "format", "mixed_language")


@dataclass
class RejectionConfig:
    """What rejection sampling keeps and how it mixes the output."""

    k: int = 4  # responses sampled per prompt
    min_tokens: int = 1  # shortest response kept, in tokens (EOS included)
    max_tokens: int = 0  # longest response kept (0: only the sampling cap; truncated ones always go)
    language: str = "en"  # target language of the chain of thought (an item's "language" overrides it)
    min_language: float = 1.0  # least share of chain-of-thought words in the target script
    require_format: bool = True  # reject responses the format reward scores 0
    dedupe: bool = True  # keep one copy of identical responses to the same prompt
    max_per_prompt: int = 0  # most samples kept per prompt (0: no cap)
    non_reasoning_fraction: float = 0.0  # share of the output made of non-reasoning pairs, in [0, 1)
    decontam_n: int = 10  # n-gram length of the decontamination against eval prompts
    seed: int = 0  # order of the mixed output and of the non-reasoning pairs drawn

    def __post_init__(self) -> None:
        lows = (("k", 1), ("min_tokens", 0), ("max_tokens", 0), ("max_per_prompt", 0), ("decontam_n", 1))
        for name, low in lows:
            if getattr(self, name) < low:
                raise ValueError(f"rejection.{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_tokens and self.max_tokens < self.min_tokens:
            raise ValueError(f"rejection.max_tokens({self.max_tokens}) < min_tokens({self.min_tokens})")
        if not 0.0 <= self.min_language <= 1.0:
            raise ValueError(f"rejection.min_language must be in [0, 1], got {self.min_language}")
        if not 0.0 <= self.non_reasoning_fraction < 1.0:
            raise ValueError(
                f"rejection.non_reasoning_fraction must be in [0, 1), got {self.non_reasoning_fraction}")
        if self.language not in SCRIPTS:
            raise ValueError(
                f"rejection.language: unknown language {self.language!r}; known: {sorted(SCRIPTS)}")


class Verdict(NamedTuple):
    """reasons: every rule the sample fails (empty: keep it); scores: what was checked, for provenance."""

    reasons: list[str]
    scores: dict[str, float]


def rejection_reasons(
    item: dict, response: str, num_tokens: int, finish_reason: str, reward: RewardResult, cfg: RejectionConfig
) -> Verdict:
    """Which rules a sampled response fails (module docstring); `reward` is the correctness check's
    result, its score 1.0 meaning correct."""
    reasons = []
    if finish_reason == "length":
        reasons.append("truncated")
    if num_tokens < cfg.min_tokens:
        reasons.append("too_short")
    if cfg.max_tokens and num_tokens > cfg.max_tokens:
        reasons.append("too_long")
    if reward.error:
        reasons.append("reward_error")
    if reward.score < 1.0:
        reasons.append("wrong")
    fmt = format_reward(response).score
    if cfg.require_format and fmt < 1.0:
        reasons.append("format")
    cot = chain_of_thought(response)
    share = language_share(cot, item.get("language", cfg.language)) if word_scripts(cot) else 1.0
    if share < cfg.min_language:
        reasons.append("mixed_language")
    return Verdict(reasons, {"correct": float(reward.score >= 1.0), "format": fmt, "language": share})


def select(
    items: list[dict],
    generations: list[list[Generation]],
    rewards: list[list[RewardResult]],
    cfg: RejectionConfig,
) -> tuple[list[dict], dict[str, int]]:
    """The SFT records of the accepted samples and the counts: samples, kept, rejected (any reason),
    rejected/<reason> for each reason, duplicate, over_cap."""
    if not (len(items) == len(generations) == len(rewards)):
        raise ValueError(
            f"select: {len(items)} items, {len(generations)} generation groups, {len(rewards)} reward groups")
    counts: Counter[str] = Counter({"samples": 0, "kept": 0, "rejected": 0, "duplicate": 0, "over_cap": 0})
    counts.update({f"rejected/{r}": 0 for r in REASONS})
    records = []
    for index, (item, group, results) in enumerate(zip(items, generations, rewards)):
        prompt_id = item.get("id", str(index))
        seen, kept_here = set(), 0
        for j, (gen, reward) in enumerate(zip(group, results, strict=True)):
            counts["samples"] += 1
            verdict = rejection_reasons(item, gen.text, gen.num_tokens, gen.finish_reason, reward, cfg)
            if verdict.reasons:
                counts["rejected"] += 1
                counts.update(f"rejected/{r}" for r in verdict.reasons)
                continue
            if cfg.dedupe and gen.text in seen:
                counts["duplicate"] += 1
                continue
            if cfg.max_per_prompt and kept_here >= cfg.max_per_prompt:
                counts["over_cap"] += 1
                continue
            seen.add(gen.text)
            kept_here += 1
            counts["kept"] += 1
            record = {"prompt": item["prompt"], "response": gen.text, "id": f"{prompt_id}/{j}",
                      "prompt_id": prompt_id, "sample_index": j, "task": item.get("task", item_kind(item)),
                      "source": "rejection_sampling", "num_tokens": gen.num_tokens,
                      "rewards": {**reward.components, **verdict.scores}}
            if "answer" in item:
                record["answer"] = item["answer"]
            records.append(record)
    return records, dict(counts)


def non_reasoning_count(kept: int, fraction: float) -> int:
    """Non-reasoning pairs that make up `fraction` of the output: round(fraction * kept / (1 - fraction))."""
    return round(fraction * kept / (1.0 - fraction))


def mix_non_reasoning(
    records: list[dict], pairs: list[dict], fraction: float, seed: int
) -> tuple[list[dict], int]:
    """`records` plus non-reasoning pairs (drawn in a seeded order, cycling when too few) making up
    `fraction` of the result, shuffled together by `seed`; returns (mixed, pairs added)."""
    need = non_reasoning_count(len(records), fraction)
    if need and not pairs:
        raise ValueError(
            f"non_reasoning_fraction {fraction} needs {need} non-reasoning pairs, but none were given")
    rng = random.Random(f"mix|{seed}")
    order = list(range(len(pairs)))
    rng.shuffle(order)
    added = []
    for m in range(need):
        pair = pairs[order[m % len(order)]]
        added.append({**pair, "id": f"{pair.get('id', 'chat')}#{m}", "source": "non_reasoning"})
    mixed = records + added
    rng.shuffle(mixed)
    return mixed, need


def decontaminate_items(
    items: list[dict], eval_texts: list[str], n: int = 10
) -> tuple[list[dict], dict[str, int]]:
    """The items whose question (else prompt) shares no word n-gram with any eval text, and the counts."""
    keyed = [{"text": item.get("question") or item["prompt"], "index": i} for i, item in enumerate(items)]
    kept, counts = decontaminate(keyed, eval_texts, n=n, key="text")
    return [items[k["index"]] for k in kept], counts


def rejection_sample(
    engine: RolloutEngine,
    tokenizer: Any,
    items: list[dict],
    cfg: RejectionConfig,
    sampling: SamplingParams,
    *,
    eval_texts: list[str] | None = None,
    non_reasoning: list[dict] | None = None,
    pool: Any = None,
    chat: bool = False,
) -> tuple[list[dict], dict]:
    """Run the steps of the module docstring; returns (SFT records, report of counts)."""
    from r1_megatron.eval.runner import make_pool

    report: dict[str, Any] = {"prompts": len(items)}
    if eval_texts is not None:
        items, report["decontam"] = decontaminate_items(items, eval_texts, cfg.decontam_n)
    if not items:
        raise ValueError("rejection_sample: no prompts left to sample from")
    own_pool = pool is None
    pool = make_pool() if own_pool else pool
    try:
        generations, rewards = generate_and_score(engine, tokenizer, items, cfg.k, sampling, pool, chat=chat)
    finally:
        if own_pool:
            pool.close()
    records, counts = select(items, generations, rewards, cfg)
    errors = Counter(e for row in rewards for r in row for e in (r.error or "").split(",") if e)
    records, added = mix_non_reasoning(records, non_reasoning or [], cfg.non_reasoning_fraction, cfg.seed)
    report.update(counts, reward_errors=dict(sorted(errors.items())), non_reasoning=added,
                  written=len(records))
    return records, report

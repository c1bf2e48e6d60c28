"""The rollout phase of a GRPO step: generate G samples per prompt, score them, gather them on every
rank, and resample all-equal groups (dynamic sampling); then the batch's reward and length metrics.

Multi-rank: every rank is a vLLM rank (rollout/placement.py): each engine generates its share of the
prompts, its first rank scores them, and the samples are all-gathered in (group, sample) order, so
every rank computes identical advantages and takes its DP share of the packed rows, whatever the layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from r1_megatron.config.schema import JobConfig
from r1_megatron.rl.advantages import all_equal_groups
from r1_megatron.data.tasks import ground_truth
from r1_megatron.rl.prompts import PromptStream
from r1_megatron.rl.types import RolloutBatch, Sample
from r1_megatron.rollout.engine import RolloutEngine, SamplingParams


def generate_and_score(
    engine: RolloutEngine, pool, tokenizer, items: list[dict], group_ids: list[int], cfg: JobConfig,
    keys: list[int] | None = None,
) -> list[Sample]:
    """Sample G responses per prompt and score them. All prompts decode in one engine batch; each
    group goes to the reward pool as soon as its last response finishes, so scoring overlaps decoding.
    keys: each prompt's index in the prompt stream (seeds its samples, see RolloutEngine.generate).

    pool None: this rank only takes part in its engine's generation (a TP follower; its leader keeps
    the samples) and returns []."""
    sampling = SamplingParams.from_config(cfg.rollout)
    tickets: list[tuple[Any, list[Sample]]] = []
    prompts = [it["prompt_ids"] for it in items]
    for i, gens in engine.generate_stream(prompts, n=cfg.rl.group_size, sampling=sampling, keys=keys):
        if pool is None:
            continue
        item = items[i]
        group = [
            Sample(
                prompt_ids=list(item["prompt_ids"]),
                response_ids=list(s.token_ids),
                rollout_logprobs=list(s.logprobs),
                routed_experts=s.routed_experts,
                group_id=group_ids[i],
                sample_index=j,
                truncated=s.truncated,
                ground_truth=ground_truth(item),
                prompt_text=item["prompt"],
                response_text=tokenizer.decode(s.token_ids, skip_special_tokens=True),
            )
            for j, s in enumerate(gens)
        ]
        tickets.append((pool.submit([(s.response_text, s.ground_truth) for s in group]), group))
    samples = []  # in the order the groups finished; gather_samples sorts them
    for ticket, group in tickets:
        for s, r in zip(group, pool.wait(ticket), strict=True):
            s.reward, s.reward_components, s.reward_error = r.score, dict(r.components), r.error
        samples.extend(group)
    return samples


def gather_samples(local: list[Sample]) -> list[Sample]:
    """Every rank gets all ranks' samples, ordered by (group_id, sample_index)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        local = [s for part in parts for s in part]
    return sorted(local, key=lambda s: (s.group_id, s.sample_index))


def collect(cfg: JobConfig, prompts: PromptStream, engine, pool, slot, tokenizer,
            gather: Callable[[list[Sample]], list[Sample]] | None = None) -> tuple[RolloutBatch, dict]:
    """Generate and score one batch (each engine its share of the prompts), with dynamic sampling:
    rounds of fresh prompts replace the groups whose rewards are all equal (rl.dynamic_sampling).
    gather: None, the collective default (gather_samples; a failure on any rank raises on all, see
    agree); else a local function joining this rank's samples of each round, for a rank that generates
    alone and without collectives (rl/async_rollout.py), whose failures raise here.
    Returns the batch and its sampling stats (all_equal_frac, sampling_rounds, the reward pool's)."""
    from r1_megatron.rollout.placement import agree

    rl = cfg.rl
    kept: list = []
    rounds = all_equal = seen = 0
    while True:
        need = rl.prompts_per_step - len(kept) // rl.group_size
        first = prompts.position  # stream index of items[0]: seeds the samples of each prompt
        items = prompts.take(need)
        mine = slot.share(need)
        local, error = [], None
        try:
            scorer = pool if slot.leader else None
            if mine:
                local = generate_and_score(engine, scorer, tokenizer, [items[i] for i in mine],
                                           [seen + i for i in mine], cfg, keys=[first + i for i in mine])
        except Exception as e:  # noqa: BLE001 (every rank must learn of it: see agree)
            if gather is not None:
                raise
            error = e
        if gather is None:
            agree(slot, error, "rollout")
        batch = RolloutBatch((gather or gather_samples)(local))
        seen, rounds = seen + need, rounds + 1
        flat = all_equal_groups(batch.rewards()[batch.group_index()])
        all_equal += int(flat.sum())
        last_round = not rl.dynamic_sampling or rounds > rl.max_resample_rounds
        kept += (batch if last_round else batch.select_groups([not f for f in flat.tolist()])).samples
        if last_round or len(kept) >= rl.prompts_per_step * rl.group_size:
            break
    if engine is not None:
        engine.release()  # GPU: vLLM sleeps (weights, KV cache) before the trainer reloads
    stats = {"all_equal_frac": all_equal / max(seen, 1), "sampling_rounds": float(rounds)}
    if pool is not None:
        stats.update(pool.stats(reset=True))  # this rank's pool (rank 0's is logged)
    return RolloutBatch(kept), stats


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Reward, accuracy, format and length statistics of one rollout batch (docs/grpo.md#logged-every-step)."""
    rewards = batch.rewards()
    lengths = batch.response_lengths().float()
    out = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "response_len/mean": float(lengths.mean()),
        "response_len/max": float(lengths.max()),
        "truncation_rate": float(batch.truncated().float().mean()),
    }
    names = sorted({k for s in batch.samples for k in s.reward_components})
    for name in names:
        out[f"reward/{name}"] = sum(s.reward_components.get(name, 0.0) for s in batch.samples) / len(batch)
    out["accuracy"] = out.get("reward/accuracy", float("nan"))
    out["format_rate"] = out.get("reward/format", float("nan"))
    errors: dict[str, int] = {}
    for s in batch.samples:
        if s.reward_error:
            errors[s.reward_error] = errors.get(s.reward_error, 0) + 1
    out.update({f"reward_error/{k}": float(v) for k, v in errors.items()})
    return out

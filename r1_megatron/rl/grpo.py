"""The pieces the GRPO loop is made of: prompt stream, rollout + scoring, microbatches, the loss.

Multi-rank: every rank draws the same prompts (the stream is deterministic). Every rank is a vLLM
rank (rollout/placement.py): each engine generates its share of the prompts, its first rank scores
them, and the samples are all-gathered in (group, sample) order, so every rank computes identical
advantages and takes its DP share of the packed rows, whatever the layout.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from r1_megatron.config.schema import JobConfig, RLConfig
from r1_megatron.data.packing import best_fit_decreasing, pack, pack_values
from r1_megatron.rl import corrections
from r1_megatron.rl.losses import policy_loss
from r1_megatron.train.microbatch import Microbatch, packed_microbatches, shard_for_data_parallel
from r1_megatron.rl.shared_prompts import EXTRAS, FILL, shared_prompt_microbatches
from r1_megatron.rl.types import LossNorm, RolloutBatch, Sample, sequence_tensors
from r1_megatron.rollout.engine import RolloutEngine, SamplingParams


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


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Reward, accuracy, format and length statistics of one rollout batch (docs/grpo.md)."""
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


def microbatches(batch: RolloutBatch, capacity: int, rows_per_microbatch: int = 1,
                 share_prompts: bool = False) -> list[Microbatch]:
    """This DP rank's packed microbatches of `batch`, with the loss's per-token tensors as extras;
    each group's prompt packed once with share_prompts (rl/shared_prompts.py), else once per sample.

    Rows are padded (with empty rows) to a multiple of dp so every rank runs the same schedule."""
    if share_prompts:
        return _dp_share(shared_prompt_microbatches(batch, capacity, rows_per_microbatch))
    seqs = [sequence_tensors(s) for s in batch.samples]
    capacity = tight_capacity([len(q.tokens) for q in seqs], capacity)
    # pack() shifts a token-aligned mask onto labels; sequence_tensors' mask is label-aligned already,
    # so hand pack the mask shifted right by one (position t's label is token t + 1).
    token_masks = [torch.cat([q.loss_mask.new_zeros(1), q.loss_mask[:-1]]) for q in seqs]
    packed = pack([q.tokens for q in seqs], capacity, loss_masks=token_masks)
    extras = {
        name: pack_values(packed, [getattr(q, name) for q in seqs], fill=FILL[name]) for name in EXTRAS
    }
    return _dp_share(packed_microbatches(packed, rows_per_microbatch, extras))


def _dp_share(mbs: list[Microbatch]) -> list[Microbatch]:
    """This DP rank's share of `mbs`, padded first with empty microbatches to a multiple of dp."""
    dp = parallel_state.get_data_parallel_world_size()
    while len(mbs) % dp:
        mbs.append(_empty_like(mbs[-1]))
    return shard_for_data_parallel(mbs, parallel_state.get_data_parallel_rank(), dp)


def tight_capacity(lengths: list[int], capacity: int, multiple: int = 8) -> int:
    """The shortest row (a multiple of `multiple`) that packs `lengths` into no more rows than rows of
    `capacity` would (raised to the longest sequence). The trainer computes every padding token, so
    64 responses that fill 11.1 rows of 512 pack into 12 rows of ~470 instead of 12 of 512."""
    capacity = max(capacity, max(lengths))
    rows = len(best_fit_decreasing(lengths, capacity))
    row = max(max(lengths), -(-sum(lengths) // rows))
    row = -(-row // multiple) * multiple
    while row < capacity and len(best_fit_decreasing(lengths, row)) > rows:
        row += multiple
    return min(row, capacity)


def _empty_like(mb: Microbatch) -> Microbatch:
    """A padding-only microbatch of the same shape: contributes nothing to the loss."""
    n = mb.shape[1]
    zeros = {k: torch.zeros_like(v) for k, v in mb.extras.items()}
    zeros["token_seq_len"] = torch.ones_like(mb.extras["token_seq_len"])
    return Microbatch(
        tokens=torch.zeros_like(mb.tokens),
        labels=torch.zeros_like(mb.labels),
        loss_mask=torch.zeros_like(mb.loss_mask),
        position_ids=torch.arange(n).reshape(1, n),
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
        extras=zeros,
    )


def attach_logprobs(trainer, mbs: list[Microbatch], name: str) -> None:
    """Store the trainer's current per-token label logprobs in each microbatch's extras[name]."""
    for mb, lp in zip(mbs, trainer.forward_logprobs(mbs), strict=True):
        mb.extras[name] = lp.to(mb.tokens.device)


def fuses_old_logprobs(cfg: RLConfig) -> bool:
    """Whether log pi_old comes from the training forward itself (rl.old_logprob_pass, docs/grpo.md): with one
    optimizer step per rollout batch, the trainer's weights before the update are pi_old, so the
    separate forward would recompute exactly the logprobs the training forward computes. Not with an
    off-policy mask (rl/corrections.py): it is fixed from pi_old before the update."""
    return (cfg.old_logprob_pass == "fused" and cfg.num_minibatches == 1 and cfg.ppo_epochs == 1
            and not corrections.enabled(cfg))


def grpo_loss(cfg: RLConfig, norm: LossNorm):
    """Trainer loss_fn: the clipped GRPO surrogate (+ KL, - entropy bonus) of rl/losses.py with global
    normalizers. `entropy` is the per-token policy entropy of the same forward (train_step(entropy=True)):
    logged, and in the loss with rl.entropy_coef > 0."""

    def loss_fn(logprobs: torch.Tensor, mb: Microbatch, entropy: torch.Tensor | None = None):
        x = {k: v.to(logprobs.device) for k, v in mb.extras.items()}
        old = x.get("old_logprobs")
        if old is None:
            if not fuses_old_logprobs(cfg):
                raise ValueError(
                    "grpo_loss: the microbatch has no old_logprobs; the training forward stands in for them "
                    f"only with rl.old_logprob_pass 'fused' (here {cfg.old_logprob_pass!r}) and one update per "
                    f"batch (rl.num_minibatches {cfg.num_minibatches} x rl.ppo_epochs {cfg.ppo_epochs} = "
                    f"{cfg.num_minibatches * cfg.ppo_epochs})")
            old = logprobs.detach()  # one update per batch: these weights are the ones that sampled
        return policy_loss(
            logprobs,
            old,
            x["advantages"],
            mb.loss_mask.to(logprobs.device),
            x["token_seq_len"],
            norm,
            cfg,
            ref_logprobs=x.get("ref_logprobs"),
            rollout_logprobs=x["rollout_logprobs"],
            entropy=entropy,
        )

    return loss_fn


def minibatches(batch: RolloutBatch, n: int) -> Iterator[RolloutBatch]:
    """Split a batch by whole groups into `n` optimizer steps (rl.num_minibatches)."""
    groups = batch.groups()
    if n < 1 or len(groups) % n:
        raise ValueError(f"rl.num_minibatches({n}) must divide the number of groups ({len(groups)})")
    per = len(groups) // n
    for i in range(n):
        yield RolloutBatch([s for g in groups[i * per : (i + 1) * per] for s in g])


class PhaseTimer:
    """Wall time per phase of a step: `with timer("rollout"): ...`; `timer.metrics()` -> time/<phase>."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + time.perf_counter() - self.t0

        return _Span()

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {"time/step": sum(self.seconds.values())}

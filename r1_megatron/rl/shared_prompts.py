"""Shared-prompt packing (rl.share_prompts): the trainer runs each group's prompt once, not G times.

Plain packing (batching.microbatches) gives every response its own copy of the prompt. Here a group
becomes one or more *bundles*: the prompt without its last token, once, then for each response a
segment [last prompt token, response tokens]. Each segment attends to the shared prompt in full and
to itself causally, and its rope positions continue the prompt's (model/attention.py,
SharedPrefixParams). A segment starts at the last prompt token because that position predicts the
response's first token, whose label differs per response.

Every per-token logprob is the one the response gets when packed alone, up to float summation
order, and so are the GRPO loss and its gradient (tests/unit/test_shared_prompts.py). Two
things do see fewer tokens: the aux-loss-free expert bias counts the prompt's routing once per
bundle instead of once per response, and the MoE sequence aux loss sees the shorter rows.

At 8 responses of 64 tokens to a 31-token prompt, the trainer's tokens drop by ~28%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1_megatron.train.microbatch import Microbatch
from r1_megatron.rl.types import RolloutBatch, Sample, sequence_tensors

# The loss's per-token tensors of a packed microbatch (both packings) and their value off the
# response tokens; token_seq_len divides, so it is never 0.
EXTRAS = ("advantages", "rollout_logprobs", "token_seq_len", "sample_key")
FILL = {"advantages": 0.0, "rollout_logprobs": 0.0, "token_seq_len": 1.0, "sample_key": 0.0}


@dataclass
class Bundle:
    """Label-aligned per-token tensors [n] of one bundle and its segment lengths (the first one is
    the shared prefix when `has_prefix`)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    positions: torch.Tensor
    extras: dict[str, torch.Tensor]
    segments: list[int]
    has_prefix: bool

    def __len__(self) -> int:
        return int(self.tokens.numel())


def _bundle(samples: list[Sample], shared: int) -> Bundle:
    """`samples` (one prompt) as one bundle sharing the prompt's first `shared` tokens (0: none)."""
    seqs = [sequence_tensors(s) for s in samples]
    first = seqs[0]
    own = lambda ts: [t[shared:] for t in ts]  # noqa: E731 (each sequence's own segment)
    parts = {
        "tokens": [first.tokens[:shared], *own([q.tokens for q in seqs])],
        "labels": [first.labels[:shared], *own([q.labels for q in seqs])],
        "loss_mask": [torch.zeros(shared), *own([q.loss_mask for q in seqs])],
        "positions": [torch.arange(shared)] + [torch.arange(shared, len(q.tokens)) for q in seqs],
    }
    extras = {
        name: torch.cat([torch.full((shared,), FILL[name]), *own([getattr(q, name) for q in seqs])])
        for name in EXTRAS
    }
    segments = ([shared] if shared else []) + [len(q.tokens) - shared for q in seqs]
    return Bundle(**{k: torch.cat(v) for k, v in parts.items()}, extras=extras, segments=segments,
                  has_prefix=shared > 0)


def _shared_length(group: list[Sample]) -> int:
    """How many prompt tokens the group's responses can share: all but the last (whose position
    predicts each response's first token), or 0 when the group's prompts differ."""
    prompt = group[0].prompt_ids
    return len(prompt) - 1 if all(s.prompt_ids == prompt for s in group) else 0


def pack_bundles(batch: RolloutBatch, capacity: int) -> list[list[Bundle]]:
    """Rows of at most `capacity` tokens, each a list of bundles.

    Best fit at the level of responses: groups go largest first; each response goes to a row that
    already holds its group's prompt if one has room for its own segment, else to the fullest row
    with room for the prompt and the segment, else to a new row. So a group that does not fit one
    row continues in another, with one more copy of its prompt there. A prompt and response longer
    than `capacity` is an error, as in plain packing."""
    for s in batch.samples:
        if len(s.prompt_ids) + s.response_len > capacity:
            raise ValueError(
                f"shared-prompt packing: sample (group {s.group_id}, index {s.sample_index}) has "
                f"{len(s.prompt_ids) + s.response_len} tokens > row capacity {capacity} (data.seq_length)")
    groups = [(g, _shared_length(g)) for g in batch.groups()]
    groups.sort(key=lambda gs: -(gs[1] + sum(s.response_len + len(s.prompt_ids) - gs[1] for s in gs[0])))
    room: list[int] = []
    placed: list[dict[int, list[Sample]]] = []  # per row: group id -> its samples there, in order
    for k, (group, shared) in enumerate(groups):
        for s in group:
            own = len(s.prompt_ids) + s.response_len - shared
            # A row that holds the group's prompt already, else the fullest row it fits in.
            best = min(((room[r] - own, r) for r in range(len(room)) if k in placed[r] and room[r] >= own),
                       default=None)
            if best is None:
                best = min(((room[r] - own - shared, r) for r in range(len(room)) if room[r] >= own + shared),
                           default=None)
            if best is None:
                room.append(capacity)
                placed.append({})
                best = (capacity - own - shared, len(room) - 1)
            left, r = best
            room[r] = left
            placed[r].setdefault(k, []).append(s)
    return [[_bundle(samples, groups[k][1]) for k, samples in row.items()] for row in placed]


def bundles(batch: RolloutBatch, capacity: int) -> list[Bundle]:
    """Every bundle of `pack_bundles`, row by row."""
    return [b for row in pack_bundles(batch, capacity) for b in row]


def shared_prompt_microbatches(
    batch: RolloutBatch, capacity: int, rows_per_microbatch: int = 1
) -> list[Microbatch]:
    """All of `batch` as packed microbatches of shared-prompt bundles, with the loss's per-token tensors
    as extras. Rows are as long as the fullest one (rounded up to 8 tokens), at most `capacity`."""
    if rows_per_microbatch < 1:
        raise ValueError(f"rows_per_microbatch must be >= 1, got {rows_per_microbatch}")
    packed = pack_bundles(batch, capacity)
    longest = max(sum(len(b) for b in row) for row in packed)
    length = min(capacity, -(-longest // 8) * 8)
    rows = [_row(row, length) for row in packed]
    return [_stream(rows[i : i + rows_per_microbatch]) for i in range(0, len(rows), rows_per_microbatch)]


def _row(members: list[Bundle], capacity: int) -> Microbatch:
    """Bundles back to back in one row of `capacity`; the tail padding is a segment of its own."""
    tail = capacity - sum(len(b) for b in members)

    def pad(fill: float, dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.full((tail,), fill, dtype=dtype)] if tail else []

    def cat(name: str, fill: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([getattr(b, name).to(dtype) for b in members] + pad(fill, dtype))

    lengths, prefix = [], []
    for b in members:
        first = len(lengths)
        for j, n in enumerate(b.segments):
            lengths.append(n)
            prefix.append(first if b.has_prefix and j > 0 else -1)
    if tail:
        lengths.append(tail)
        prefix.append(-1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Microbatch(
        tokens=cat("tokens", 0, torch.long)[None],
        labels=cat("labels", 0, torch.long)[None],
        loss_mask=cat("loss_mask", 0.0, torch.float32)[None],
        position_ids=torch.cat([b.positions for b in members] + ([torch.arange(tail)] if tail else []))[None],
        cu_seqlens=cu,
        extras={
            name: torch.cat([b.extras[name] for b in members] + pad(FILL[name], torch.float32))[None]
            for name in EXTRAS
        },
        segment_prefix=torch.tensor(prefix, dtype=torch.long),
    )


def _stream(rows: list[Microbatch]) -> Microbatch:
    """Rows laid end to end as one thd stream (segment indices and boundaries shifted)."""
    cu, prefix, offset, segs = [rows[0].cu_seqlens[:1]], [], 0, 0
    for r in rows:
        cu.append(r.cu_seqlens[1:] + offset)
        prefix.append(torch.where(r.segment_prefix >= 0, r.segment_prefix + segs, -1))
        offset += r.shape[1]
        segs += r.segment_prefix.numel()
    cat = lambda name: torch.cat([getattr(r, name) for r in rows], dim=1)  # noqa: E731
    return Microbatch(
        tokens=cat("tokens"),
        labels=cat("labels"),
        loss_mask=cat("loss_mask"),
        position_ids=cat("position_ids"),
        cu_seqlens=torch.cat(cu),
        extras={name: torch.cat([r.extras[name] for r in rows], dim=1) for name in EXTRAS},
        segment_prefix=torch.cat(prefix),
    )

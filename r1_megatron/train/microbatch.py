"""Microbatches as the trainer consumes them: padded rows or packed rows, plus the loss's tensors.

A padded microbatch is [b, s]: each row one sequence from position 0, padding at the end (causal
attention means padding never influences real tokens). A packed microbatch is one stream [1, s]:
sequences back to back, position ids restarting at each, and `cu_seqlens` marking the boundaries,
fed to megatron as PackedSeqParams(qkv_format="thd") so attention, rope and the MTP shift all stay
inside each sequence. Several packed rows of data/packing.py form one stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from r1_megatron.data.packing import PackedBatch, cu_seqlens_for


@dataclass
class Microbatch:
    """One microbatch. tokens, labels (long), loss_mask (float), position_ids (long): [b, s].

    cu_seqlens: int32 [n + 1] for a packed stream (then b == 1), None for padded rows.
    segment_prefix: long [n] for a stream with shared prefixes (rl/shared_prompts.py): the segment
    each segment also attends to (-1: none); position_ids then hold the rope positions. None otherwise.
    extras: per-token tensors [b, s] for the loss function (e.g. old_logprobs, ref_logprobs,
    rollout_logprobs, advantages, token_seq_len), padded along with the tokens.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    segment_prefix: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.tokens.shape)
        for name in ("labels", "loss_mask", "position_ids"):
            if tuple(getattr(self, name).shape) != shape:
                got = tuple(getattr(self, name).shape)
                raise ValueError(f"Microbatch.{name}: shape {got} != tokens {shape}")
        for name, t in self.extras.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"Microbatch.extras[{name!r}]: shape {tuple(t.shape)} != tokens {shape}")
        if self.cu_seqlens is not None:
            if shape[0] != 1:
                raise ValueError(f"Microbatch: a packed stream has one row, got tokens {shape}")
            if int(self.cu_seqlens[-1]) != shape[1]:
                end = int(self.cu_seqlens[-1])
                raise ValueError(f"Microbatch.cu_seqlens ends at {end}, the stream has {shape[1]}")
        if self.segment_prefix is not None:
            n = 0 if self.cu_seqlens is None else self.cu_seqlens.numel() - 1
            if self.segment_prefix.shape != (n,):
                raise ValueError(f"Microbatch.segment_prefix: shape {tuple(self.segment_prefix.shape)}, "
                                 f"the stream has {n} segments (cu_seqlens)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def padded_to(self, length: int) -> Microbatch:
        """The same microbatch with `length` positions; the new ones are padding (loss_mask 0).

        In a packed stream the padding becomes one more sequence of its own."""
        s = self.shape[1]
        if length == s:
            return self
        if length < s:
            raise ValueError(f"Microbatch.padded_to({length}): already {s} long")

        def grow(t: torch.Tensor, fill: float | int) -> torch.Tensor:
            pad = torch.full((t.shape[0], length - s), fill, dtype=t.dtype, device=t.device)
            return torch.cat([t, pad], dim=1)

        positions = torch.arange(length - s, device=self.position_ids.device).expand(self.shape[0], -1)
        cu = prefix = None
        if self.cu_seqlens is not None:
            cu = torch.cat([self.cu_seqlens, self.cu_seqlens.new_tensor([length])])
        if self.segment_prefix is not None:
            prefix = torch.cat([self.segment_prefix, self.segment_prefix.new_tensor([-1])])
        return replace(
            self,
            tokens=grow(self.tokens, 0),
            labels=grow(self.labels, 0),
            loss_mask=grow(self.loss_mask, 0.0),
            position_ids=torch.cat([self.position_ids, positions], dim=1),
            cu_seqlens=cu,
            extras={k: grow(v, 0.0 if v.is_floating_point() else 0) for k, v in self.extras.items()},
            segment_prefix=prefix,
        )

    def to(self, device: torch.device) -> Microbatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            tokens=move(self.tokens),
            labels=move(self.labels),
            loss_mask=move(self.loss_mask),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            extras={k: move(v) for k, v in self.extras.items()},
            segment_prefix=move(self.segment_prefix),
        )


def packed_microbatches(
    batch: PackedBatch, rows_per_microbatch: int = 1, extras: dict[str, torch.Tensor] | None = None
) -> list[Microbatch]:
    """Group the rows of a PackedBatch into streams of `rows_per_microbatch` rows each.

    extras: per-token tensors laid out like batch.tokens ([R, T], e.g. from packing.pack_values).
    """
    if rows_per_microbatch < 1:
        raise ValueError(f"rows_per_microbatch must be >= 1, got {rows_per_microbatch}")
    extras = extras or {}
    out = []
    num_rows = batch.tokens.shape[0]
    for first in range(0, num_rows, rows_per_microbatch):
        rows = list(range(first, min(first + rows_per_microbatch, num_rows)))

        def stream(t: torch.Tensor) -> torch.Tensor:
            return t[rows].reshape(1, -1)

        out.append(
            Microbatch(
                tokens=stream(batch.tokens),
                labels=stream(batch.labels),
                loss_mask=stream(batch.loss_mask),
                position_ids=stream(batch.position_ids),
                cu_seqlens=cu_seqlens_for(batch, rows),
                extras={k: stream(v) for k, v in extras.items()},
            )
        )
    return out


def padded_microbatches(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    micro_batch_size: int,
    extras: dict[str, torch.Tensor] | None = None,
) -> list[Microbatch]:
    """Split right-padded rows [B, T] into microbatches of `micro_batch_size` rows."""
    extras = extras or {}
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = []
    for first in range(0, tokens.shape[0], micro_batch_size):
        rows = slice(first, first + micro_batch_size)
        out.append(
            Microbatch(
                tokens=tokens[rows],
                labels=labels[rows],
                loss_mask=loss_mask[rows].float(),
                position_ids=positions[rows].clone(),
                extras={k: v[rows] for k, v in extras.items()},
            )
        )
    return out


def shard_for_data_parallel(
    microbatches: Sequence[Microbatch], dp_rank: int, dp_size: int
) -> list[Microbatch]:
    """This DP rank's contiguous share of a global list of microbatches (the count must divide)."""
    n = len(microbatches)
    if n % dp_size:
        raise ValueError(f"{n} microbatches do not split over data-parallel size {dp_size}")
    per = n // dp_size
    return list(microbatches[dp_rank * per : (dp_rank + 1) * per])


def empty_like(mb: Microbatch) -> Microbatch:
    """A padding-only microbatch of mb's shape: contributes nothing to the loss (its extras are zeros,
    with token_seq_len 1 so per-sequence normalisers never divide by 0)."""
    n = mb.shape[1]
    zeros = {k: torch.zeros_like(v) for k, v in mb.extras.items()}
    if "token_seq_len" in zeros:
        zeros["token_seq_len"] = torch.ones_like(mb.extras["token_seq_len"])
    return Microbatch(
        tokens=torch.zeros_like(mb.tokens),
        labels=torch.zeros_like(mb.labels),
        loss_mask=torch.zeros_like(mb.loss_mask),
        position_ids=torch.arange(n).reshape(1, n),
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
        extras=zeros,
    )


def pad_for_data_parallel(mbs: list[Microbatch], dp: int) -> list[Microbatch]:
    """`mbs` padded in place with empty microbatches to a multiple of dp, so every DP rank runs the
    same schedule (SFT and GRPO batches alike)."""
    while len(mbs) % dp:
        mbs.append(empty_like(mbs[-1]))
    return mbs

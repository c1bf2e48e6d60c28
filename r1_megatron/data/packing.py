"""Best-fit-decreasing packing of variable-length sequences into fixed-capacity rows.

A packed row holds several sequences back to back, then padding. Sequences never see each other:
position ids restart at 0 for each sequence, attention is block-diagonal causal, and the boundaries
are given as ``cu_seqlens`` for megatron's ``PackedSeqParams(qkv_format="thd")``. The padding tail is
its own segment (it attends to itself, so no softmax row is empty and no NaN can appear).

Labels are shifted inside each sequence: position t is trained to predict token t+1 of the *same*
sequence; the last position of a sequence and all padding have loss_mask 0.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign sequence indices to rows: longest first, each into the fullest row it still fits.

    Returns rows as lists of indices into `lengths`, in placement order. Deterministic: ties go to
    the lower index / the older row.
    """
    if capacity < 1:
        raise ValueError(f"packing: capacity must be >= 1, got {capacity}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"packing: sequence {i} has length {n}, outside 1..capacity({capacity})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row id) of rows that still have room
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))  # the row with the least room that still fits n
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


@dataclass
class PackedBatch:
    """R packed rows of capacity T, from N sequences.

    tokens, labels, position_ids, seq_index: [R, T] int64 (seq_index is -1 on padding);
    loss_mask: [R, T] float32; cu_seqlens: R int32 tensors [n_r + 1] (+1 more with a padding tail);
    rows: the sequence indices in each row; lengths: [N] (after truncation);
    where: [N] (row, start) of each sequence.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    seq_index: torch.Tensor
    cu_seqlens: list[torch.Tensor]
    rows: list[list[int]]
    lengths: list[int]
    where: list[tuple[int, int]]
    capacity: int

    @property
    def efficiency(self) -> float:
        """Share of row slots that hold real tokens."""
        return sum(self.lengths) / max(1, self.tokens.numel())


def pack(sequences: Sequence[Any], capacity: int, *, loss_masks: Sequence[Any] | None = None,
         pad_id: int = 0, truncate: bool = False) -> PackedBatch:
    """Pack token sequences (lists, arrays or 1-D tensors) into rows of `capacity` tokens.

    loss_masks: per sequence, aligned with its tokens, 1 where the token is a training target (e.g.
    response tokens); default all ones. A sequence longer than `capacity` is an error, or is cut to
    its first `capacity` tokens with ``truncate=True``.
    """
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    if not arrays:
        raise ValueError("packing: no sequences to pack")
    if loss_masks is not None and len(loss_masks) != len(arrays):
        raise ValueError(f"packing: {len(loss_masks)} loss masks for {len(arrays)} sequences")
    masks = None if loss_masks is None else [np.asarray(m, np.float32).reshape(-1) for m in loss_masks]
    for i, a in enumerate(arrays):
        if masks is not None and masks[i].shape != a.shape:
            raise ValueError(f"packing: loss mask {i} has {masks[i].size} entries, its sequence {a.size}")
        if len(a) > capacity:
            if not truncate:
                raise ValueError(f"packing: sequence {i} has {len(a)} tokens > capacity {capacity} "
                                 "(pass truncate=True to cut it)")
            arrays[i] = a[:capacity]
            if masks is not None:
                masks[i] = masks[i][:capacity]
    lengths = [len(a) for a in arrays]
    rows = best_fit_decreasing(lengths, capacity)

    # Vectorized layout: concatenate the sequences in row order, then scatter each token to
    # row * capacity + (start of its sequence in the row) + (its offset in the sequence).
    perm = np.fromiter((i for members in rows for i in members), np.int64, len(arrays))
    lens = np.asarray(lengths, np.int64)[perm]
    row_of = np.repeat(np.arange(len(rows)), [len(members) for members in rows])
    seq_flat_start = np.concatenate(([0], np.cumsum(lens)[:-1]))
    row_first = np.concatenate(([0], np.cumsum([len(members) for members in rows])[:-1])).astype(np.int64)
    start_in_row = seq_flat_start - seq_flat_start[row_first][row_of]
    shift = np.repeat(row_of * capacity + start_in_row - seq_flat_start, lens)
    dest = np.arange(int(lens.sum())) + shift
    last = seq_flat_start + lens - 1  # flat index of each sequence's last token

    flat_tokens = np.concatenate([arrays[i] for i in perm])
    flat_masks = (np.ones(len(flat_tokens), np.float32) if masks is None
                  else np.concatenate([masks[i] for i in perm]))
    next_tokens = np.append(flat_tokens[1:], pad_id)
    next_tokens[last] = pad_id
    next_masks = np.append(flat_masks[1:], 0.0).astype(np.float32)
    next_masks[last] = 0.0

    shape = (len(rows), capacity)
    tokens = np.full(shape, pad_id, np.int64)
    labels = np.full(shape, pad_id, np.int64)
    loss_mask = np.zeros(shape, np.float32)
    seq_index = np.full(shape, -1, np.int64)
    used = np.bincount(row_of, weights=lens, minlength=len(rows)).astype(np.int64)
    # The padding tail counts from 0 too; real tokens are overwritten below.
    position_ids = np.maximum(np.arange(capacity)[None, :] - used[:, None], 0)
    tokens.reshape(-1)[dest] = flat_tokens
    labels.reshape(-1)[dest] = next_tokens
    loss_mask.reshape(-1)[dest] = next_masks
    seq_index.reshape(-1)[dest] = np.repeat(perm, lens)
    position_ids.reshape(-1)[dest] = np.arange(len(dest)) - np.repeat(seq_flat_start, lens)

    where: list[tuple[int, int]] = [(0, 0)] * len(arrays)
    for i, r, st in zip(perm.tolist(), row_of.tolist(), start_in_row.tolist()):
        where[i] = (r, st)
    ends, first, flat_bounds, sizes = (start_in_row + lens).tolist(), row_first.tolist(), [], []
    for r, members in enumerate(rows):
        bounds = [0, *ends[first[r]:first[r] + len(members)]]
        if bounds[-1] < capacity:
            bounds.append(capacity)
        flat_bounds += bounds
        sizes.append(len(bounds))
    cu_seqlens = list(torch.tensor(flat_bounds, dtype=torch.int32).split(sizes))
    return PackedBatch(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(loss_mask),
                       torch.from_numpy(position_ids), torch.from_numpy(seq_index), cu_seqlens, rows,
                       lengths, where, capacity)


def pack_values(batch: PackedBatch, values: Sequence[Any], *, fill: float = 0.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Lay per-token values (each aligned with its sequence's tokens) out like the tokens: [R, T]."""
    if len(values) != len(batch.lengths):
        raise ValueError(f"pack_values: {len(values)} value arrays for {len(batch.lengths)} sequences")
    out = torch.full(tuple(batch.tokens.shape), fill, dtype=dtype)
    for i, v in enumerate(values):
        v = torch.as_tensor(v, dtype=dtype).reshape(-1)
        n = batch.lengths[i]
        if v.numel() < n:
            raise ValueError(f"pack_values: sequence {i} has {n} tokens but {v.numel()} values")
        r, start = batch.where[i]
        out[r, start:start + n] = v[:n]
    return out


def unpack(batch: PackedBatch, packed: torch.Tensor, *, drop_last: bool = False) -> list[torch.Tensor]:
    """Split a per-position tensor [R, T, ...] back into per-sequence tensors [L_i, ...], input order.

    drop_last=True gives L_i - 1 values: the predictions of tokens 1..L_i-1 (e.g. label logprobs).
    """
    if tuple(packed.shape[:2]) != tuple(batch.tokens.shape):
        raise ValueError(f"unpack: got shape {tuple(packed.shape)}, rows are {tuple(batch.tokens.shape)}")
    cut = 1 if drop_last else 0
    return [packed[r, start:start + n - cut] for (r, start), n in zip(batch.where, batch.lengths)]


def attention_mask(seq_index: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask from seq_index [T] or [R, T]: bool [R, 1, T, T], True = masked out.

    Megatron's convention (its attention fills True with -inf). Padding (-1) forms one causal block.
    """
    index = seq_index.reshape(-1, seq_index.shape[-1])
    length = index.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    allowed = (index[:, :, None] == index[:, None, :]) & causal
    return (~allowed).unsqueeze(1)


def cu_seqlens_for(batch: PackedBatch, rows: Sequence[int]) -> torch.Tensor:
    """cu_seqlens [k+1] int32 for `rows` laid end to end as one [1, len(rows)*T] THD stream."""
    parts = [batch.cu_seqlens[rows[0]]]
    for j, r in enumerate(rows[1:], start=1):
        parts.append(batch.cu_seqlens[r][1:] + j * batch.capacity)
    return torch.cat(parts)


def packed_seq_params(batch: PackedBatch, rows: Sequence[int]) -> Any:
    """megatron-core PackedSeqParams (qkv_format "thd") for `rows` fed as one concatenated stream."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens_for(batch, rows)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)

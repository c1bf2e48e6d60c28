"""From a rollout batch to this DP rank's packed microbatches: minibatches by whole groups, packing
into rows as short as the packing allows, and each rank's share, padded to a multiple of dp so every
rank runs the same schedule. The loss's per-token tensors travel as each microbatch's extras.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import parallel_state

from r1_megatron.data.packing import best_fit_decreasing, pack, pack_values
from r1_megatron.train.microbatch import (
    Microbatch,
    packed_microbatches,
    pad_for_data_parallel,
    shard_for_data_parallel,
)
from r1_megatron.rl.shared_prompts import EXTRAS, FILL, shared_prompt_microbatches
from r1_megatron.rl.types import RolloutBatch, sequence_tensors


def minibatches(batch: RolloutBatch, n: int) -> Iterator[RolloutBatch]:
    """Split a batch by whole groups into `n` optimizer steps (rl.num_minibatches)."""
    groups = batch.groups()
    if n < 1 or len(groups) % n:
        raise ValueError(f"rl.num_minibatches({n}) must divide the number of groups ({len(groups)})")
    per = len(groups) // n
    for i in range(n):
        yield RolloutBatch([s for g in groups[i * per : (i + 1) * per] for s in g])


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
    return shard_for_data_parallel(pad_for_data_parallel(mbs, dp), parallel_state.get_data_parallel_rank(), dp)


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

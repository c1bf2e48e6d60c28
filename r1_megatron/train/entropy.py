"""Per-token policy entropy from vocab-parallel logits, in the training forward itself.

The output layer of the last pipeline stage yields logits [s, b, V/tp] sharded over the vocabulary
(TP). `vocab_parallel_entropy` reduces three per-token statistics over the TP group, as megatron's
vocab-parallel cross entropy does: the max logit (MAX), then sum_v e^{x_v - max} and
sum_v e^{x_v - max} (x_v - max) (one SUM). With Z and E[x] so obtained, H = log Z - E[x]; no rank
ever holds the full-vocabulary softmax.

The backward needs no communication: dH/dx_v = -p_v (log p_v + H) for the vocabulary entries v of
this shard, from the global log Z and H saved in the forward. The input gradient of the output layer
is then summed over TP by megatron's ColumnParallelLinear, as for the cross entropy.

`capture_entropy(model)` hooks the output layer for the span of one model call and collects the
entropy of every logits tensor it yields ([b, s], like megatron's per-token loss). In GPTModel's
postprocess the MTP heads (when enabled) go through the same output layer first and the main head
last, so the main head's entropy is the last entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        # Half-precision logits are upcast: the statistics sum V small terms. A new tensor is kept for
        # the backward, never `logits` itself: megatron's cross entropy then rewrites fp32 logits in place.
        x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        peak = x.max(dim=-1).values
        if group is not None:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = x - peak.unsqueeze(-1)
        e = shifted.exp()
        stats = torch.stack([e.sum(dim=-1), (e * shifted).sum(dim=-1)])
        del e
        if group is not None:
            dist.all_reduce(stats, group=group)
        sum_exp, weighted = stats[0], stats[1]
        log_z = sum_exp.log()  # of the shifted logits
        entropy = log_z - weighted / sum_exp
        ctx.save_for_backward(shifted, log_z, entropy)
        ctx.input_dtype = logits.dtype
        return entropy

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        shifted, log_z, entropy = ctx.saved_tensors
        logp = shifted - log_z.unsqueeze(-1)
        p = logp.exp()
        # dH/dx_v = -p_v (log p_v + H), times the incoming gradient; built in place on `logp`.
        g = logp.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-grad.unsqueeze(-1))
        return g.to(ctx.input_dtype), None


def vocab_parallel_entropy(logits: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[..., V/tp] -> [...]: -sum_v p_v log p_v over the whole vocabulary, differentiable; fp32 (fp64
    for fp64 logits).

    `logits` is this rank's vocabulary shard; `group` the ranks holding the other shards (None or a
    group of one: the whole vocabulary is here)."""
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    return _VocabParallelEntropy.apply(logits, group)


@contextlib.contextmanager
def capture_entropy(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, every forward of `model`'s output layer appends its per-token entropy [b, s].

    Yields the list; it stays empty on a pipeline stage without the output layer."""
    found: list[torch.Tensor] = []
    layer = getattr(model, "output_layer", None)
    if layer is None:
        yield found
        return

    def hook(module: torch.nn.Module, args, output) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        found.append(vocab_parallel_entropy(logits, getattr(module, "tp_group", None)).transpose(0, 1))

    handle = layer.register_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()

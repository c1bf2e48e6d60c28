"""The largest training-inference logprob gap of a step: max |log pi_old - log pi_vllm| over loss tokens.

Means (mismatch_abs, mismatch_k3) are sums the loss function returns and the trainer adds up over
microbatches and DP ranks (rl/losses.py); a maximum is not, so `MaxGap` wraps the loss function,
keeps the running maximum on this rank and reduces it with MAX over the data-parallel and pipeline
groups (only the last stage computes the loss; TP ranks hold the same value).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class MaxGap:
    def __init__(self) -> None:
        self.value = 0.0

    def wrap(self, loss_fn: Callable) -> Callable:
        def wrapped(logprobs: torch.Tensor, mb, **kw):
            m = mb.loss_mask.to(logprobs.device) > 0
            old = mb.extras.get("old_logprobs")
            old = logprobs.detach() if old is None else old.to(logprobs.device)  # fused: this forward is pi_old
            gap = (old - mb.extras["rollout_logprobs"].to(logprobs.device)).abs()
            if m.any():
                self.value = max(self.value, float(gap[m].max()))
            return loss_fn(logprobs, mb, **kw)

        return wrapped

    def metrics(self) -> dict[str, float]:
        t = torch.tensor([self.value], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
            t = t.to(dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_pipeline_model_parallel_group())
        return {"mismatch_abs_max": float(t[0])}

"""The non-finite guard: a step whose loss or gradient is not finite never reaches the weights
(docs/grpo.md#non-finite-steps).

Why it is needed: DDP runs with check_for_nan_in_grad=False (that check raises rather than skips), the
fp32 optimizer's prepare_grads never looks for inf/nan, and the bf16 path without a loss scaler has the
same blind spot. A NaN grad norm then lets Adam write NaN into the weights, and a later save can move
`latest` onto them.

What it does (Trainer.train_step, before the optimizer touches anything):
- the step's loss terms (already summed over microbatches and DP ranks, identical on every rank) and
  the global grad norm (megatron's get_grad_norm: all-reduced over the model-parallel groups) are
  checked; one MAX all-reduce of the two flags over the world makes every rank take the same decision;
- a bad step is skipped on every rank: no optimizer step (weights, main weights, Adam moments and step
  count untouched), no LR-schedule step, and the aux-loss-free expert bias, which megatron's
  finalize_model_grads already moved during the backward, is put back from a snapshot;
- the first non-finite loss term, or the first parameter (by name, dense or expert group, and rank)
  whose gradient is not finite, is logged; `optim.max_bad_steps` consecutive skips stop the run with
  NonFiniteError (one line, naming the step).
Which term is "first": the named terms in the order of TERMS (GRPO's pg_loss, kl_loss, entropy_loss,
then the auxiliary mtp_loss and moe_aux_loss), then the other metrics by name, and the objective (the
loss handed to backward, and the `loss` metric that equals it) last. A NaN in one term also makes the
objective NaN, so checking the objective first would always name 'loss'.
train/checkpointing.py refuses to save, and train/weights.py to export, weights that hold a non-finite
value (`first_nonfinite_weight`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from r1_megatron.parallel.collectives import all_reduce_

log = logging.getLogger(__name__)

OBJECTIVE = "_objective"  # the key under which train_step sums the loss handed to backward
# The loss terms, in the order they are checked (module docstring): the objective's own terms first.
TERMS = ("pg_loss", "kl_loss", "entropy_loss", "mtp_loss", "moe_aux_loss")
_TOTALS = ("loss", OBJECTIVE)  # checked last: a NaN in any term reaches them too


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: one line naming the step and the cause."""

    one_line = True  # r1m prints the message alone (no traceback) and exits 1


def _first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    for name, t in named:
        if t is not None and not bool(torch.isfinite(t).all()):
            return name
    return None


def _agree(local: str | None) -> tuple[int, str] | None:
    """(lowest rank, its finding) over the world; collective (an object gather: rare path only)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None if local is None else (0, local)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return next(((r, f) for r, f in enumerate(everyone) if f is not None), None)


def _param_grads(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor | None]]:
    """Each parameter's gradient, named with its megatron optimizer group: "expert" for the expert-parallel
    weights (allreduce=False), "dense" for the rest (expert weights too when ep is 1)."""
    for name, p in model.named_parameters():
        group = "dense" if getattr(p, "allreduce", True) else "expert"
        grad = getattr(p, "main_grad", None)
        yield f"{name} ({group} group)", p.grad if grad is None else grad


def first_nonfinite_weight(model: torch.nn.Module) -> tuple[int, str] | None:
    """(rank, parameter name) of the first non-finite weight over the world, or None; collective."""
    local = _first_nonfinite(model.named_parameters())
    flag = all_reduce_(torch.tensor([float(local is not None)]), op=dist.ReduceOp.MAX) \
        if dist.is_initialized() else torch.tensor([float(local is not None)])
    return _agree(local) if flag.item() else None


class StepGuard:
    """Per-trainer state of the guard: the expert-bias snapshot and the skip counters."""

    def __init__(self, model: torch.nn.Module, max_bad_steps: int, enabled: bool = True) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"optim.max_bad_steps must be >= 1, got {max_bad_steps}")
        self.model, self.max_bad_steps, self.enabled = model, max_bad_steps, enabled
        self.skipped = 0  # steps skipped so far (train/skipped_steps)
        self.consecutive = 0
        self._biases: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin(self) -> None:
        """Snapshot the routers' expert biases before the step's backward moves them."""
        if not self.enabled:
            return
        self._biases = [(m.expert_bias, m.expert_bias.detach().clone()) for m in self.model.modules()
                        if getattr(m, "expert_bias", None) is not None]

    def check(self, step: int, metrics: dict[str, float], grad_norm: float, found_inf: bool) -> str | None:
        """Why step `step` must be skipped (None: it may update). Collective over the world."""
        if not self.enabled:
            return None
        others = sorted(k for k in metrics if k not in TERMS and k not in _TOTALS)
        ordered = [*TERMS, *others, *_TOTALS]
        bad_term = next((k for k in ordered if k in metrics and not math.isfinite(metrics[k])), None)
        flags = torch.tensor([float(bad_term is not None), float(found_inf or not math.isfinite(grad_norm))])
        if dist.is_initialized():
            all_reduce_(flags, op=dist.ReduceOp.MAX)
        if not flags.any():
            self.consecutive = 0
            return None
        parts = []
        if flags[0]:
            term = "loss" if bad_term in (None, *_TOTALS) else bad_term
            parts.append(f"non-finite loss term '{term}'")
        if flags[1]:
            where = _agree(_first_nonfinite(_param_grads(self.model)))
            first = f", first in {where[1]} on rank {where[0]}" if where else ""
            parts.append(f"non-finite gradient (grad norm {grad_norm}){first}")
        return "; ".join(parts)

    def skip(self, step: int, reason: str) -> None:
        """Undo what the backward changed outside the optimizer, count, and stop after too many."""
        with torch.no_grad():
            for live, saved in self._biases:
                live.copy_(saved)
        self.skipped += 1
        self.consecutive += 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning("train: step %d skipped (%d in a row): %s", step, self.consecutive, reason)
        if self.consecutive >= self.max_bad_steps:
            raise NonFiniteError(
                f"train: {self.consecutive} consecutive steps skipped (optim.max_bad_steps="
                f"{self.max_bad_steps}), the last at step {step}: {reason}"
            )

"""The train phase of a GRPO step: the GRPO loss as the trainer's loss_fn (the math is rl/losses.py),
and the optimizer steps over the prepared minibatches, rl.ppo_epochs times.
"""

from __future__ import annotations

import torch

from r1_megatron.config.schema import RLConfig
from r1_megatron.rl import corrections
from r1_megatron.rl.losses import finalize_metrics, policy_loss
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.rl.mismatch import MaxGap
from r1_megatron.rl.mtp import rl_mtp
from r1_megatron.rl.router_replay import routing_metrics
from r1_megatron.rl.types import LossNorm


def fuses_old_logprobs(cfg: RLConfig) -> bool:
    """Whether log pi_old comes from the training forward itself (rl.old_logprob_pass,
    docs/grpo.md#minibatches-epochs-and-log-pi_old): with one optimizer step per rollout batch, the trainer's weights before the update are pi_old, so the
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


def update(trainer, rl: RLConfig, parts: list, step_routing: dict) -> dict:
    """rl.ppo_epochs passes over `parts` (rl/prepare.py: one (microbatches, norm) per minibatch), one
    optimizer step each. step_routing[id(mbs)]: the minibatch's router-replay plan and whether its
    old-logprob pass ran. Returns the last step's metrics (loss terms, logprob gap, routing)."""
    metrics: dict = {}
    for _epoch in range(rl.ppo_epochs):
        for mbs, norm in parts:
            # the MTP head per rl.mtp_loss_coef (rl/loop.py); the routing context replays (rl.router_replay)
            gap = MaxGap()
            mtp = rl_mtp(trainer.unwrapped, rl.mtp_loss_coef, rl.mtp_detach_trunk)
            routing_plan, old_pass_ran = step_routing[id(mbs)]
            with mtp, routing_plan.update(old_pass_ran) as routing:
                sums = trainer.train_step(mbs, gap.wrap(grpo_loss(rl, norm)), entropy=True)
            metrics = {**finalize_metrics(sums), **gap.metrics(), **routing_metrics(routing)}
    return metrics

"""The logprobs phase of a GRPO step, between rollout and update: group advantages, then per
minibatch the packed microbatches with old logprobs (unless the training forward gives them,
rl.old_logprob_pass), reference logprobs (KL in the loss), router-replay plans and correction masks.
"""

from __future__ import annotations

import torch

from r1_megatron.config.schema import JobConfig
from r1_megatron.rl import corrections, router_replay
from r1_megatron.rl.advantages import assign_advantages
from r1_megatron.rl.batching import microbatches, minibatches
from r1_megatron.rl.loss import fuses_old_logprobs
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.rl.types import RolloutBatch


def prepare(batch: RolloutBatch, cfg: JobConfig, trainer, micro_batch_size: int, reference,
            seq_k1: torch.Tensor | None) -> tuple[list, dict, dict]:
    """Advantages (seq_k1: the per-sequence KL penalty with rl.kl_in 'reward'), then per minibatch:
    packed microbatches with old (unless fused into the training forward, fuses_old_logprobs) and
    reference logprobs. Returns the (microbatches, norm) of each minibatch, the advantage metrics, and
    each minibatch's routing (keyed by id(microbatches): router-replay plan, whether the old pass ran)."""
    rl, max_len = cfg.rl, cfg.rollout.max_new_tokens
    step_routing = {}
    adv_metrics = assign_advantages(batch, rl, max_len, seq_k1)
    parts = []
    for part in minibatches(batch, rl.num_minibatches):
        mbs = microbatches(part, cfg.data.seq_length, micro_batch_size, share_prompts=rl.share_prompts)
        routing = router_replay.StepRouting(trainer, mbs, part.samples, rl)
        if not fuses_old_logprobs(rl):
            with routing.old_pass():
                attach_logprobs(trainer, mbs, "old_logprobs")
        step_routing[id(mbs)] = (routing, not fuses_old_logprobs(rl))
        if reference is not None and rl.kl_in == "loss":
            for mb, lp in zip(mbs, reference.logprobs(mbs), strict=True):
                mb.extras["ref_logprobs"] = lp
        norm = part.loss_norm(max_len)
        if corrections.enabled(rl):  # removed tokens leave the numerator and the normalizer
            adv_metrics.update(corrections.apply_masks(mbs, rl))
            norm = corrections.masked_norm(mbs, max_len)
        parts.append((mbs, norm))
    return parts, adv_metrics, step_routing


def attach_logprobs(trainer, mbs: list[Microbatch], name: str) -> None:
    """Store the trainer's current per-token label logprobs in each microbatch's extras[name]."""
    for mb, lp in zip(mbs, trainer.forward_logprobs(mbs), strict=True):
        mb.extras[name] = lp.to(mb.tokens.device)

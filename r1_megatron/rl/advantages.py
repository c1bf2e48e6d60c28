"""Group-relative advantages (docs/grpo.md) as pure tensor functions, plus one function that applies them.

Rewards come as a [num_groups, G] matrix (`RolloutBatch.group_index` gives the layout).
Order of operations in `assign_advantages`: overlong reward shaping, then KL-in-reward, then
baseline and (optional) std normalization.

Choices where the papers leave room:
- `baseline` and `std_normalize` compose: leave-one-out subtracts mean(r_{j!=i}), and with
  std_normalize still on, divides by the group std, so (r_i - mean_{-i}) = G/(G-1) (r_i - mean).
  Set std_normalize: false for the plain RLOO advantage.
- `overlong: penalty` replaces a truncated sample's reward by -1. `soft_penalty` is DAPO's length
  penalty, added to the reward of every sample whose length reaches into the last `buffer` tokens.
  `mask` keeps the truncated sample's reward in its group's statistics (as DAPO's overlong
  filtering does) but zeroes its loss mask.
- KL-in-reward uses the sequence-level k1, sum_t (log pi_old - log pi_ref), under the old policy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from r1_megatron.config.schema import RLConfig
from r1_megatron.rl.types import RolloutBatch

Baseline = Callable[[torch.Tensor], torch.Tensor]
_BASELINES: dict[str, Baseline] = {}


def register_baseline(name: str) -> Callable[[Baseline], Baseline]:
    """Decorator: make a [P, G] -> [P, G] baseline selectable as `rl.baseline: name`."""

    def wrap(fn: Baseline) -> Baseline:
        _BASELINES[name] = fn
        return fn

    return wrap


def get_baseline(name: str) -> Baseline:
    if name not in _BASELINES:
        raise KeyError(f"rl.baseline: unknown baseline '{name}'; registered: {sorted(_BASELINES)}")
    return _BASELINES[name]


@register_baseline("mean")
def mean_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P, G]: the group mean, broadcast to every member."""
    return rewards.mean(dim=-1, keepdim=True).expand_as(rewards)


@register_baseline("leave_one_out")
def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P, G]: mean of the other G-1 rewards of the group."""
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError(f"rl.baseline: leave_one_out needs group_size >= 2, got {g}")
    return (rewards.sum(dim=-1, keepdim=True) - rewards) / (g - 1)


def group_advantages(
    rewards: torch.Tensor, baseline: str = "mean", std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """[P, G] rewards -> [P, G] advantages: (r - baseline) / (std + eps), or r - baseline.

    std is the unbiased group std (as in DeepSeekMath's GRPO); Dr. GRPO drops it.
    """
    if rewards.dim() != 2:
        shape = tuple(rewards.shape)
        raise ValueError(f"group_advantages: rewards must be [num_groups, G], got shape {shape}")
    adv = rewards - get_baseline(baseline)(rewards)
    if std_normalize:
        if rewards.shape[-1] < 2:
            raise ValueError("rl.std_normalize: the unbiased std needs group_size >= 2")
        adv = adv / (rewards.std(dim=-1, unbiased=True, keepdim=True) + eps)
    return adv


def all_equal_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P] bool: groups whose rewards are all equal (they carry no learning signal)."""
    return (rewards == rewards[..., :1]).all(dim=-1)


def overlong_penalty(rewards: torch.Tensor, truncated: torch.Tensor, penalty: float = -1.0) -> torch.Tensor:
    """Truncated samples get reward `penalty`; others keep theirs. Any matching shapes."""
    return torch.where(truncated, torch.full_like(rewards, penalty), rewards)


def soft_overlong_penalty(
    rewards: torch.Tensor, lengths: torch.Tensor, max_len: int, buffer: int
) -> torch.Tensor:
    """DAPO's length penalty: add clamp(((max_len - buffer) - L) / buffer, -1, 0) to the reward.

    0 up to max_len - buffer, then linear down to -1 at max_len.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"rl.overlong_buffer: must be in (0, max_response_len={max_len}], got {buffer}")
    pen = ((max_len - buffer) - lengths.to(rewards.dtype)) / buffer
    return rewards + pen.clamp(min=-1.0, max=0.0)


def kl_in_reward(rewards: torch.Tensor, seq_k1: torch.Tensor, beta: float) -> torch.Tensor:
    """r - beta * k1, with seq_k1 the per-sequence sum of log pi_old - log pi_ref (same shape as r)."""
    return rewards - beta * seq_k1


def per_sequence_sum(values: torch.Tensor, seq_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum per-token values into [num_sequences] by sequence id (any layout; id < 0 = not a sequence)."""
    v, ids = values.reshape(-1), seq_ids.reshape(-1)
    keep = ids >= 0
    out = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, ids[keep], v[keep])


def assign_advantages(
    batch: RolloutBatch,
    cfg: RLConfig,
    max_response_len: int,
    seq_k1: torch.Tensor | None = None,
) -> dict[str, float]:
    """Set `advantage` (and, for overlong: mask, `loss_mask`) on every sample; return step metrics.

    seq_k1: [N] in `batch.samples` order, needed when cfg.kl_in == "reward" and cfg.kl_coef > 0.
    """
    idx = batch.group_index()
    rewards = batch.rewards(torch.float64)[idx]
    truncated = batch.truncated()[idx]
    lengths = batch.response_lengths()[idx]
    shaped = rewards
    if cfg.overlong == "penalty":
        shaped = overlong_penalty(shaped, truncated)
    elif cfg.overlong == "soft_penalty":
        shaped = soft_overlong_penalty(shaped, lengths, max_response_len, cfg.overlong_buffer)
    if cfg.kl_in == "reward" and cfg.kl_coef > 0:
        if seq_k1 is None:
            raise ValueError("rl.kl_in=reward with rl.kl_coef > 0 needs the per-sequence k1 (seq_k1)")
        shaped = kl_in_reward(shaped, seq_k1.to(torch.float64)[idx], cfg.kl_coef)
    adv = group_advantages(shaped, cfg.baseline, cfg.std_normalize, cfg.adv_eps)
    for i, a, t in zip(idx.reshape(-1).tolist(), adv.reshape(-1).tolist(), truncated.reshape(-1).tolist()):
        sample = batch.samples[i]
        sample.advantage = a
        if cfg.overlong == "mask" and t:
            sample.loss_mask = [0.0] * sample.response_len
    return {
        "all_equal_frac": all_equal_groups(rewards).double().mean().item(),
        "zero_signal_frac": all_equal_groups(shaped).double().mean().item(),
        "truncation_rate": truncated.double().mean().item(),
        "shaped_reward_mean": shaped.mean().item(),
        "advantage_abs_mean": adv.abs().mean().item(),
    }

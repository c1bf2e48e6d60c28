"""Off-policy masks for the training-inference mismatch (docs/grpo.md), as pure tensor functions.

Each mask decides, from the trainer's log pi_old and vLLM's log pi_rollout, which loss tokens stay:

- MIS (sequence-level masked importance sampling, `rl.mis: [low, high]`): a sequence stays when its
  geometric-mean ratio exp(mean_t log(pi_old / pi_rollout)) lies in [low, high]; else all its tokens go.
- IcePop (`rl.icepop: [low, high]`, the paper's [0.5, 5]): a token stays when pi_old / pi_rollout
  lies in [low, high].
- DeepSeek-V3.2's off-policy sequence mask (`rl.offpolicy_mask_delta: delta`). The paper (V3.2 §3.1,
  "Off-Policy Sequence Masking") sets M_i = 0 when A_i < 0 and
  (1/|o_i|) sum_t log(pi_old(o_t | q, o_<t) / pi_theta(o_t | q, o_<t)) > delta, else 1, where its
  pi_old is the sampling policy as returned by the inference engine: a per-sequence k1 estimate of
  KL(pi_rollout || pi_theta), so both the engine mismatch and policy staleness count. Here pi_theta
  is the trainer's weights before the update (the log pi_old pass). Why not the weights of each
  update: the mask must be fixed before the step so that a removed token leaves the global
  normalizer (`LossNorm`) as well as the numerator, and so that any split into microbatches or DP
  ranks gives the same gradient. With one update per rollout batch the two are the same.

A removed token leaves both the loss numerator and its normalizer (docs/grpo.md): `apply_masks` zeroes
the microbatches' loss_mask, recounts each sequence's loss tokens (token_seq_len), and `masked_norm`
recounts the global LossNorm over all DP ranks. The fraction each mask removes is logged (as a
fraction of the loss tokens before masking; a token removed by two masks counts in both).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from r1_megatron.config.schema import RLConfig
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.rl.types import LossNorm

_LOG_RATIO_CLAMP = 20.0


def enabled(cfg: RLConfig) -> bool:
    """Whether any off-policy mask is configured (then log pi_old is needed before the update)."""
    return cfg.mis is not None or cfg.icepop is not None or cfg.offpolicy_mask_delta is not None


def segment_ids(mb: Microbatch) -> torch.Tensor:
    """[b, s] long: which sequence each position belongs to (a padded row, or a packed segment)."""
    b, s = mb.shape
    if mb.cu_seqlens is None:
        return torch.arange(b).unsqueeze(1).expand(b, s)
    bounds = mb.cu_seqlens[1:].to(torch.long)
    return torch.bucketize(torch.arange(s), bounds, right=True).unsqueeze(0)


def segment_mean(x: torch.Tensor, mask: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Per position: the mean of x over the masked positions of its segment (0 where it has none)."""
    m = mask > 0
    flat_seg = seg.reshape(-1)
    n = int(flat_seg.max()) + 1 if flat_seg.numel() else 0
    xs = torch.where(m, x, torch.zeros_like(x)).reshape(-1).to(torch.float64)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, flat_seg, xs)
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, flat_seg, m.reshape(-1).to(torch.float64))
    return (total / count.clamp(min=1))[flat_seg].reshape(x.shape).to(x.dtype)


def _log_ratio(num: torch.Tensor, den: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(num)
    d = torch.where(mask > 0, num - den, zero).detach()
    return d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def _bounds(name: str, bounds: list[float]) -> tuple[float, float]:
    if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1]:
        raise ValueError(f"rl.{name}: expected [low, high] with 0 <= low <= high, got {bounds}")
    return float(bounds[0]), float(bounds[1])


def mis_keep(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
             seg: torch.Tensor, bounds: list[float]) -> torch.Tensor:
    """Bool per position: its sequence's geometric-mean ratio pi_old/pi_rollout lies in [low, high]."""
    low, high = _bounds("mis", bounds)
    gm = torch.exp(segment_mean(_log_ratio(old_logprobs, rollout_logprobs, mask), mask, seg))
    return (gm >= low) & (gm <= high)


def icepop_keep(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                bounds: list[float]) -> torch.Tensor:
    """Bool per position: the token's ratio pi_old/pi_rollout lies in [low, high]."""
    low, high = _bounds("icepop", bounds)
    ratio = torch.exp(_log_ratio(old_logprobs, rollout_logprobs, mask))
    return (ratio >= low) & (ratio <= high)


def offpolicy_keep(current_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, seg: torch.Tensor, delta: float) -> torch.Tensor:
    """Bool per position: False for a sequence with A < 0 whose mean log(pi_rollout/pi_theta) > delta."""
    if not delta >= 0:
        raise ValueError(f"rl.offpolicy_mask_delta: must be >= 0, got {delta}")
    kl = segment_mean(_log_ratio(rollout_logprobs, current_logprobs, mask), mask, seg)
    adv = segment_mean(advantages.detach(), mask, seg)  # A_i is constant over a sequence's tokens
    return ~((adv < 0) & (kl > delta))


def keep_masks(mb: Microbatch, cfg: RLConfig) -> dict[str, torch.Tensor]:
    """The configured masks of one microbatch (needs extras old_logprobs and rollout_logprobs)."""
    x, mask, seg = mb.extras, mb.loss_mask, segment_ids(mb)
    if "old_logprobs" not in x:
        raise ValueError("off-policy masks: the microbatch has no old_logprobs (needs the separate pi_old pass)")
    old, roll = x["old_logprobs"].to(mask.dtype), x["rollout_logprobs"].to(mask.dtype)
    out: dict[str, torch.Tensor] = {}
    if cfg.mis is not None:
        out["mis"] = mis_keep(old, roll, mask, seg, cfg.mis)
    if cfg.icepop is not None:
        out["icepop"] = icepop_keep(old, roll, mask, cfg.icepop)
    if cfg.offpolicy_mask_delta is not None:
        out["offpolicy"] = offpolicy_keep(old, roll, x["advantages"], mask, seg, cfg.offpolicy_mask_delta)
    return out


def apply_masks(mbs: list[Microbatch], cfg: RLConfig) -> dict[str, float]:
    """Zero the rejected tokens' loss_mask and recount token_seq_len, in place; the global fraction of
    loss tokens each mask removed (all DP ranks), as metrics `<mask>_masked_frac`."""
    names = [n for n, on in (("mis", cfg.mis), ("icepop", cfg.icepop), ("offpolicy", cfg.offpolicy_mask_delta))
             if on is not None]
    counts = torch.zeros(len(names) + 2, dtype=torch.float64)  # per mask, then all removed, then loss tokens
    for mb in mbs:
        m = mb.loss_mask > 0
        keep = keep_masks(mb, cfg)
        kept = m.clone()
        for i, name in enumerate(names):
            counts[i] += float((m & ~keep[name]).sum())
            kept &= keep[name]
        counts[-2] += float((m & ~kept).sum())
        counts[-1] += float(m.sum())
        mb.loss_mask = mb.loss_mask * kept.to(mb.loss_mask.dtype)
        seg = segment_ids(mb)
        per_seq = _segment_counts(kept, seg)[seg.reshape(-1)].reshape(mb.shape)
        # token_seq_len divides, so it is never 0 (a fully removed sequence has loss_mask 0 anyway).
        mb.extras["token_seq_len"] = per_seq.clamp(min=1).to(mb.extras["token_seq_len"].dtype)
    _dp_sum(counts)
    total = max(float(counts[-1]), 1.0)
    out = {f"{name}_masked_frac": float(counts[i]) / total for i, name in enumerate(names)}
    out["offpolicy_masks_removed_frac"] = float(counts[-2]) / total
    return out


def masked_norm(mbs: list[Microbatch], max_response_len: int) -> LossNorm:
    """LossNorm recounted from the (masked) microbatches of all DP ranks: removed tokens and fully
    removed sequences leave the normalizer."""
    counts = torch.zeros(2, dtype=torch.float64)
    for mb in mbs:
        per_seq = _segment_counts(mb.loss_mask > 0, segment_ids(mb))
        counts[0] += per_seq.sum()
        counts[1] += (per_seq > 0).sum()
    _dp_sum(counts)
    return LossNorm(int(counts[0]), int(counts[1]), max_response_len)


def _segment_counts(keep: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """[num segments] float64: how many positions of each segment `keep` marks."""
    flat = seg.reshape(-1)
    return torch.zeros(int(flat.max()) + 1, dtype=torch.float64).index_add_(
        0, flat, keep.reshape(-1).to(torch.float64))


def _dp_sum(t: torch.Tensor) -> None:
    """Sum `t` in place over the data-parallel ranks (each holds its own share of the microbatches)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron.core import parallel_state

        if parallel_state.get_data_parallel_world_size() > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
            moved = t.to(dev)
            dist.all_reduce(moved, group=parallel_state.get_data_parallel_group())
            t.copy_(moved.cpu())

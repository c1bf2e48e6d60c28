"""The GRPO per-token policy loss (docs/grpo.md) as pure tensor functions, registered by name.

Layout-free: every per-token input has the same shape ([B, T] padded rows, [1, T] packed rows, or
flat), and positions with loss_mask == 0 (prompt, padding, other sequences' boundaries) drop out.

Global normalization. The loss of one microbatch is sum_t w_t * l_t with weights w_t fixed by the
whole optimizer step (`LossNorm`, over all microbatches of all DP ranks) and by `token_seq_len`
(each token carries the loss-token count of its own sequence). The step loss is therefore the
plain *sum* of the microbatch losses, and so is its gradient: any split into microbatches, DP
ranks or packed rows gives the same gradient. The caller must make megatron sum rather than
average (its schedule divides by num_microbatches and DDP by the DP size unless told otherwise).

Departures and choices:
- TIS multiplies the whole per-token loss l = pg + beta * D (both are estimates over tokens
  sampled by vLLM), not the entropy bonus, which is exact per position.
- Log-ratios are clamped to [-20, 20] before exp, as verl does, so a stray token cannot overflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from r1_megatron.config.schema import RLConfig
from r1_megatron.rl.types import LossNorm

_LOG_RATIO_CLAMP = 20.0

Aggregation = Callable[[torch.Tensor, torch.Tensor, LossNorm], torch.Tensor]
KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_AGGREGATIONS: dict[str, Aggregation] = {}
_KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_aggregation(name: str) -> Callable[[Aggregation], Aggregation]:
    """Decorator: make `fn(loss_mask, token_seq_len, norm) -> weights` selectable as rl.loss_agg."""

    def wrap(fn: Aggregation) -> Aggregation:
        _AGGREGATIONS[name] = fn
        return fn

    return wrap


def register_kl(name: str) -> Callable[[KLEstimator], KLEstimator]:
    """Decorator: make `fn(logprobs, ref_logprobs) -> D` selectable as rl.kl_estimator."""

    def wrap(fn: KLEstimator) -> KLEstimator:
        _KL_ESTIMATORS[name] = fn
        return fn

    return wrap


def get_aggregation(name: str) -> Aggregation:
    if name not in _AGGREGATIONS:
        raise KeyError(f"rl.loss_agg: unknown mode '{name}'; registered: {sorted(_AGGREGATIONS)}")
    return _AGGREGATIONS[name]


def get_kl(name: str) -> KLEstimator:
    if name not in _KL_ESTIMATORS:
        raise KeyError(f"rl.kl_estimator: unknown estimator '{name}'; registered: {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[name]


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(loss_mask: torch.Tensor, token_seq_len: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    """w_t = m_t / (|o_i| * G): (1/G) sum_i (1/|o_i|) sum_t l_{i,t}."""
    return loss_mask / (token_seq_len.clamp(min=1) * max(norm.num_sequences, 1))


@register_aggregation("token-mean")
def token_mean(loss_mask: torch.Tensor, token_seq_len: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    """w_t = m_t / sum_i |o_i| over the global batch (DAPO)."""
    return loss_mask / max(norm.num_tokens, 1)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    loss_mask: torch.Tensor, token_seq_len: torch.Tensor, norm: LossNorm
) -> torch.Tensor:
    """w_t = m_t / (G * max_response_len) (Dr. GRPO: a constant normalizer)."""
    return loss_mask / max(norm.num_sequences * norm.max_response_len, 1)


@register_kl("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref."""
    return logprobs - ref_logprobs


@register_kl("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """1/2 (log pi - log pi_ref)^2."""
    return 0.5 * (logprobs - ref_logprobs).square()


@register_kl("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1, always >= 0."""
    d = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1


def clipped_pg_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A), dual-clipped to <= -c*A for A < 0.

    Returns (loss, clipped, dual_clipped); the two bool tensors mark where a bound is active
    (and the gradient is therefore zero).
    """
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual = torch.zeros_like(is_clipped)
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"rl.dual_clip_c: must be > 1, got {dual_clip_c}")
        bound = -dual_clip_c * advantages
        is_dual = (advantages < 0) & (loss > bound)
        loss = torch.where(is_dual, bound, loss)
    return loss, is_clipped, is_dual


def tis_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights min(pi_old / pi_vllm, cap), detached; and where the cap bit."""
    if cap <= 0:
        raise ValueError(f"rl.tis: the cap must be > 0, got {cap}")
    log_w = (old_logprobs - rollout_logprobs).detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    w = torch.exp(log_w)
    return w.clamp(max=cap), w > cap


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...]: -sum_v p_v log p_v, differentiable."""
    # Half-precision logits are upcast: the entropy sums V small terms.
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    logp = torch.log_softmax(x, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    token_seq_len: torch.Tensor,
    norm: LossNorm,
    cfg: RLConfig,
    *,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This microbatch's share of the step loss, and its additive metrics (see `finalize_metrics`).

    Per-token inputs share one shape [...]; logits is [..., V] (or pass a precomputed entropy [...],
    e.g. from vocab-parallel logits). ref_logprobs is needed when kl_in == "loss" and kl_coef > 0,
    rollout_logprobs when tis is set; given anyway, they feed the KL and mismatch metrics.
    """
    m = loss_mask > 0
    # Zero every logprob off the mask, so garbage there (padding, prompt, -inf) cannot turn
    # 0 * inf into nan; masked tokens then have log-ratio 0 and weight 0.
    zero = torch.zeros_like(logprobs)
    lp = torch.where(m, logprobs, zero)
    old = torch.where(m, old_logprobs, zero).detach()
    ref = None if ref_logprobs is None else torch.where(m, ref_logprobs, zero).detach()
    roll = None if rollout_logprobs is None else torch.where(m, rollout_logprobs, zero).detach()
    weights = get_aggregation(cfg.loss_agg)(loss_mask, token_seq_len, norm)
    pg, is_clipped, is_dual = clipped_pg_loss(
        lp - old, advantages, cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c
    )
    kl = None if ref is None else get_kl(cfg.kl_estimator)(lp, ref)
    kl_term = zero
    if cfg.kl_in == "loss" and cfg.kl_coef > 0:
        if kl is None:
            raise ValueError("rl.kl_in=loss with rl.kl_coef > 0 needs ref_logprobs")
        kl_term = cfg.kl_coef * kl
    tis_w, tis_clip = torch.ones_like(zero), torch.zeros_like(m)
    if cfg.tis is not None:
        if roll is None:
            raise ValueError("rl.tis is set but no rollout_logprobs were given")
        tis_w, tis_clip = tis_weights(old, roll, cfg.tis)
    pg_loss = (weights * tis_w * pg).sum()
    kl_loss = (weights * tis_w * kl_term).sum()
    if entropy is None and logits is not None:
        entropy = entropy_from_logits(logits)
    ent_loss = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("rl.entropy_coef > 0 needs logits or entropy")
        ent_loss = -cfg.entropy_coef * (weights * torch.where(m, entropy, zero)).sum()
    loss = pg_loss + kl_loss + ent_loss
    metrics = {
        "loss": loss.detach(),
        "pg_loss": pg_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "entropy_loss": ent_loss.detach(),
        **_token_sums(m, is_clipped, is_dual, kl, entropy, old, roll, tis_w, tis_clip, cfg),
    }
    return loss, metrics


def _token_sums(
    m: torch.Tensor,
    is_clipped: torch.Tensor,
    is_dual: torch.Tensor,
    kl: torch.Tensor | None,
    entropy: torch.Tensor | None,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor | None,
    tis_w: torch.Tensor,
    tis_clip: torch.Tensor,
    cfg: RLConfig,
) -> dict[str, torch.Tensor]:
    """Sums over loss tokens (keys ending in _sum) and their count, detached."""
    mf = m.to(old_logprobs.dtype)

    def masked_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(m, x.detach().to(mf.dtype), torch.zeros_like(mf)).sum()

    out = {
        "num_tokens": mf.sum(),
        "clip_frac_sum": masked_sum(is_clipped),
        "dual_clip_frac_sum": masked_sum(is_dual),
    }
    if kl is not None:
        out["kl_sum"] = masked_sum(kl)
    if entropy is not None:
        out["entropy_sum"] = masked_sum(entropy)
    if rollout_logprobs is not None:
        out["mismatch_abs_sum"] = masked_sum((old_logprobs - rollout_logprobs).abs())
        # k3 estimate of KL(pi_vllm || pi_old) from tokens sampled by vLLM.
        out["mismatch_k3_sum"] = masked_sum(kl_k3(rollout_logprobs, old_logprobs))
    if cfg.tis is not None:
        out["tis_weight_sum"] = masked_sum(tis_w)
        out["tis_clipped_frac_sum"] = masked_sum(tis_clip)
    return out


def finalize_metrics(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Turn metrics summed over microbatches and DP ranks into step values.

    Keys ending in _sum become token means (the suffix dropped); the loss parts are already
    globally normalized, so their sum is the step value.
    """
    n = max(float(sums.get("num_tokens", 0.0)), 1.0)
    out: dict[str, float] = {}
    for key, value in sums.items():
        if key.endswith("_sum"):
            out[key[: -len("_sum")]] = float(value) / n
        else:
            out[key] = float(value)
    return out


def sum_metrics(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Add up the metric dicts of several microbatches (same keys in each)."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out[key] + value if key in out else value.clone()
    return out

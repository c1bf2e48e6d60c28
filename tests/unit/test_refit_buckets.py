"""Refit bucketing and canary helpers, without an engine.

Guarantees: `bucketize` keeps every (name, tensor) pair, in order, the very same tensor objects; no
bucket exceeds the size unless it holds one tensor larger than the size alone; buckets are filled
greedily (a bucket closes only when the next tensor would not fit); bad sizes are refused. The
canary sequences are deterministic, in range, and the CanaryError message names version and numbers;
the default canary tolerance follows the engine's and the trainer's dtypes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1_megatron.rollout.refit import (
    CANARY_TOL,
    CANARY_TOL_MIXED,
    CanaryError,
    bucketize,
    canary_sequences,
    canary_tolerance,
)


def _stream(numels: list[int], dtype=torch.float32):
    return [(f"t{i}", torch.zeros(n, dtype=dtype)) for i, n in enumerate(numels)]


def _sizes(bucket):
    return [t.numel() * t.element_size() for _, t in bucket]


def test_hand_computed_buckets():
    # fp32 tensors of 10, 20, 5, 40, 1 elements = 40, 80, 20, 160, 4 bytes; buckets of 100 bytes
    buckets = list(bucketize(_stream([10, 20, 5, 40, 1]), 100))
    assert [[name for name, _ in b] for b in buckets] == [["t0"], ["t1", "t2"], ["t3"], ["t4"]]
    assert [sum(_sizes(b)) for b in buckets] == [40, 100, 160, 4]


def test_tensor_larger_than_a_bucket_travels_alone():
    stream = _stream([3, 1000, 3], dtype=torch.bfloat16)  # 6, 2000, 6 bytes
    buckets = list(bucketize(stream, 64))
    assert [[n for n, _ in b] for b in buckets] == [["t0"], ["t1"], ["t2"]]
    assert buckets[1][0][1] is stream[1][1]  # not split, not copied


def test_lazy_and_empty():
    consumed = []

    def gen():
        for name, t in _stream([4, 4, 4]):
            consumed.append(name)
            yield name, t

    it = bucketize(gen(), 32)  # two 16-byte tensors per bucket
    first = next(it)
    assert [n for n, _ in first] == ["t0", "t1"] and consumed == ["t0", "t1", "t2"]  # one tensor of lookahead
    assert list(bucketize(iter([]), 10)) == []


@pytest.mark.parametrize("size", [0, -5])
def test_bad_bucket_size(size):
    with pytest.raises(ValueError, match="bucket size must be >= 1 byte"):
        list(bucketize(_stream([1]), size))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=30), st.integers(1, 1200))
def test_bucket_invariants(numels, bucket_bytes):
    stream = _stream(numels)
    buckets = list(bucketize(stream, bucket_bytes))
    flat = [pair for b in buckets for pair in b]
    assert [n for n, _ in flat] == [n for n, _ in stream]
    assert all(a[1] is b[1] for a, b in zip(flat, stream, strict=True))
    for i, b in enumerate(buckets):
        assert b, "empty bucket"
        assert sum(_sizes(b)) <= bucket_bytes or len(b) == 1
        if i + 1 < len(buckets):  # greedy: the next tensor did not fit
            assert sum(_sizes(b)) + _sizes(buckets[i + 1])[0] > bucket_bytes


def test_canary_sequences_are_fixed_and_in_range():
    a = canary_sequences(vocab_size=50, length=20, count=3, seed=7)
    assert a == canary_sequences(vocab_size=50, length=20, count=3, seed=7)
    assert a != canary_sequences(vocab_size=50, length=20, count=3, seed=8)
    assert len(a) == 3 and all(len(s) == 20 and all(0 <= t < 50 for t in s) for s in a)
    with pytest.raises(ValueError, match="canary length must be >= 2"):
        canary_sequences(vocab_size=50, length=1)


def test_canary_error_message():
    where = "sequence 0, token 5: engine -1 vs trainer -1.25"
    err = CanaryError(version=7, mean_err=0.05, tol=1e-3, max_err=0.25, where=where)
    msg = str(err)
    assert "weights version 7" in msg and "mean |logprob error| 0.05 > tolerance 0.001" in msg
    assert "max 0.25" in msg and "sequence 0, token 5" in msg and "\n" not in msg
    assert (err.version, err.mean_err, err.tol, err.max_err) == (7, 0.05, 1e-3, 0.25)


def test_canary_tolerance_by_dtype():
    # Same dtype on both sides: fp32 tight, bf16/fp16 looser; mixed dtypes (the engine runs rounded
    # weights) loosest, in either order.
    assert canary_tolerance("float32", torch.float32) == CANARY_TOL["float32"] == 1e-3
    assert canary_tolerance("bfloat16", torch.bfloat16) == CANARY_TOL["bfloat16"] > 10 * CANARY_TOL["float32"]
    mixed = canary_tolerance("bfloat16", torch.float32)
    assert mixed == canary_tolerance("float32", "bfloat16") == CANARY_TOL_MIXED
    assert CANARY_TOL_MIXED > CANARY_TOL["bfloat16"]

"""Best-fit packing guarantees.

- Every sequence lands in exactly one row, no row exceeds capacity, and on lengths uniform in 16..512
  with capacity 1024 at least 95% of the slots hold real tokens; 10k sequences pack in under a second.
- A hand-worked case gives the expected rows, tokens, labels, positions, cu_seqlens and mask.
- Position ids restart per sequence, labels never cross a sequence boundary, the mask is exactly
  block-diagonal causal (checked against a brute-force definition), unpack inverts pack.
- A plain torch causal-attention model with RoPE (written here, run with torch SDPA) gives the same
  outputs on packed rows as on each sequence alone; without the mask or the position restart it does
  not, so the check has teeth.
"""

import math
import random
import time

import pytest
import torch
import torch.nn.functional as F

from r1_megatron.data.packing import (
    attention_mask,
    best_fit_decreasing,
    cu_seqlens_for,
    pack,
    pack_values,
    packed_seq_params,
    unpack,
)


def _uniform_sequences(n: int, seed: int, low: int = 16, high: int = 512) -> list[torch.Tensor]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (rng.randint(low, high),), generator=gen) for _ in range(n)]


def test_hand_worked_case():
    # BFD by hand: sizes 4 (#2), 3 (#0), 2 (#1) into capacity 6: 4 opens row 0 (room 2), 3 does not
    # fit there and opens row 1 (room 3), 2 fits both and goes to the fuller row 0.
    seqs = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    masks = [[0, 1, 1], [1, 1], [0, 0, 1, 1]]
    b = pack(seqs, 6, loss_masks=masks, pad_id=0)
    assert b.rows == [[2, 1], [0]]
    assert b.tokens.tolist() == [[31, 32, 33, 34, 21, 22], [11, 12, 13, 0, 0, 0]]
    assert b.labels.tolist() == [[32, 33, 34, 0, 22, 0], [12, 13, 0, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert b.seq_index.tolist() == [[2, 2, 2, 2, 1, 1], [0, 0, 0, -1, -1, -1]]
    assert [c.tolist() for c in b.cu_seqlens] == [[0, 4, 6], [0, 3, 6]]
    assert all(c.dtype == torch.int32 for c in b.cu_seqlens)
    m = attention_mask(b.seq_index)
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    allowed_row0 = [  # 1 = may attend; block of 4 then block of 2, each lower-triangular
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1],
    ]
    assert (~m[0, 0]).int().tolist() == allowed_row0
    assert cu_seqlens_for(b, [0, 1]).tolist() == [0, 4, 6, 9, 12]


def test_efficiency_and_placement_on_uniform_lengths():
    seqs = _uniform_sequences(10_000, seed=0)
    b = pack(seqs, 1024)
    placed = sorted(i for row in b.rows for i in row)
    assert placed == list(range(len(seqs)))
    assert max(sum(len(seqs[i]) for i in row) for row in b.rows) <= 1024
    total = sum(len(s) for s in seqs)
    assert b.efficiency == pytest.approx(total / (len(b.rows) * 1024))
    assert b.efficiency >= 0.95
    assert len(b.rows) >= math.ceil(total / 1024)  # sanity: no packing beats the volume bound


def test_packing_10k_is_fast():
    seqs = _uniform_sequences(10_000, seed=1)
    # CPU time of this process, best of 3: the machine is shared, so wall time is noisy.
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        pack(seqs, 1024)
        best = min(best, time.process_time() - start)
    assert best < 1.0, f"packing 10k sequences took {best:.2f}s of CPU"


def test_bfd_is_never_worse_than_first_fit_in_input_order():
    rng = random.Random(3)
    for _ in range(20):
        lengths = [rng.randint(1, 100) for _ in range(200)]
        rows = best_fit_decreasing(lengths, 128)
        first_fit: list[int] = []
        for n in lengths:
            k = next((k for k, used in enumerate(first_fit) if used + n <= 128), None)
            if k is None:
                first_fit.append(n)
            else:
                first_fit[k] += n
        assert len(rows) <= len(first_fit)


def test_roundtrip_positions_labels_and_mask_on_random_batch():
    rng = random.Random(7)
    seqs = [torch.randint(0, 500, (rng.randint(1, 40),)) for _ in range(60)]
    masks = [torch.randint(0, 2, (len(s),)).float() for s in seqs]
    b = pack(seqs, 64, loss_masks=masks, pad_id=511)
    for i, (tok, pos, lab, lm, idx) in enumerate(zip(
            unpack(b, b.tokens), unpack(b, b.position_ids), unpack(b, b.labels, drop_last=True),
            unpack(b, b.loss_mask), unpack(b, b.seq_index))):
        n = len(seqs[i])
        assert torch.equal(tok, seqs[i])
        assert pos.tolist() == list(range(n))
        assert torch.equal(lab, seqs[i][1:])
        assert torch.equal(lm[:-1], masks[i][1:]) and lm[-1] == 0
        assert (idx == i).all()
    pad = b.seq_index == -1
    assert (b.tokens[pad] == 511).all() and (b.loss_mask[pad] == 0).all()
    # Brute-force definition of the mask: j visible from i iff same sequence and j <= i.
    m = attention_mask(b.seq_index)[:, 0]
    for r in range(b.tokens.shape[0]):
        idx = b.seq_index[r]
        same = idx[:, None] == idx[None, :]
        j_le_i = torch.arange(64)[None, :] <= torch.arange(64)[:, None]
        assert torch.equal(m[r], ~(same & j_le_i))
        # cu_seqlens are exactly the places where the sequence index changes (plus both ends).
        change = [0] + [t for t in range(1, 64) if idx[t] != idx[t - 1]] + [64]
        assert b.cu_seqlens[r].tolist() == change


def test_pack_values_and_unpack_invert_each_other():
    seqs = _uniform_sequences(300, seed=5, low=1, high=90)
    b = pack(seqs, 128)
    values = [torch.randn(len(s)) for s in seqs]
    laid = pack_values(b, values, fill=float("nan"))
    assert torch.isnan(laid[b.seq_index == -1]).all()
    for v, back in zip(values, unpack(b, laid)):
        assert torch.equal(v, back)
    with pytest.raises(ValueError, match="sequence 0 has"):
        pack_values(b, [torch.zeros(0)] + values[1:])


def test_too_long_is_an_error_or_truncated():
    seqs = [list(range(10)), list(range(3))]
    with pytest.raises(ValueError, match=r"sequence 0 has 10 tokens > capacity 8"):
        pack(seqs, 8)
    b = pack(seqs, 8, truncate=True)
    assert b.lengths == [8, 3]
    assert unpack(b, b.tokens)[0].tolist() == list(range(8))
    with pytest.raises(ValueError, match="loss mask 1"):
        pack(seqs, 16, loss_masks=[[1] * 10, [1, 1]])
    with pytest.raises(ValueError, match="no sequences"):
        pack([], 8)


class _TinyCausalLM(torch.nn.Module):
    """Token + absolute position embedding -> 2 pre-norm attention+MLP blocks with RoPE -> logits.

    Input tokens and positions [B, T], output [B, T, V]. RoPE alone only sees relative offsets, which a
    shared shift cannot change; the absolute embedding makes the position restart observable.
    """

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos_embed = torch.nn.Embedding(64, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"qkv": torch.nn.Linear(dim, 3 * dim), "out": torch.nn.Linear(dim, dim),
                                 "mlp": torch.nn.Linear(dim, dim), "norm": torch.nn.LayerNorm(dim)})
            for _ in range(2)
        )
        self.head = torch.nn.Linear(dim, vocab)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        freq = 1.0 / (10000 ** (torch.arange(half) / half))
        angle = pos[:, None, :, None].float() * freq  # [B, 1, T, half]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        b, t = tokens.shape
        h = self.embed(tokens) + self.pos_embed(pos)
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm"](h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            q, k = self._rope(q, pos), self._rope(k, pos)
            if masked is None:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # SDPA's boolean mask means "may attend": the inverse of megatron's
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)
            h = h + blk["out"](a.transpose(1, 2).reshape(b, t, -1))
            h = h + torch.tanh(blk["mlp"](h))
        return self.head(h)


def test_packed_attention_equals_separate_runs():
    torch.manual_seed(0)
    model = _TinyCausalLM().eval()
    rng = random.Random(11)
    seqs = [torch.randint(0, 64, (rng.randint(2, 20),)) for _ in range(12)]
    b = pack(seqs, 32)
    with torch.no_grad():
        packed = model(b.tokens, b.position_ids, attention_mask(b.seq_index))
        alone = [model(s[None], torch.arange(len(s))[None], None)[0] for s in seqs]
        for got, want in zip(unpack(b, packed), alone):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # Teeth: a plain causal mask over the row, or positions that do not restart, break it.
        leaky = unpack(b, model(b.tokens, b.position_ids, None))
        row_pos = torch.arange(32).expand_as(b.tokens)
        shifted = unpack(b, model(b.tokens, row_pos, attention_mask(b.seq_index)))
    later = [i for row in b.rows for i in row[1:]]  # sequences that are not first in their row
    assert later
    assert max((leaky[i] - alone[i]).abs().max().item() for i in later) > 1e-3
    assert max((shifted[i] - alone[i]).abs().max().item() for i in later) > 1e-3


def test_megatron_packed_seq_params():
    b = pack([[1] * 5, [2] * 3, [3] * 7], 8)
    params = packed_seq_params(b, [0, 1])
    assert params.qkv_format == "thd"
    assert torch.equal(params.cu_seqlens_q, cu_seqlens_for(b, [0, 1]))
    assert params.cu_seqlens_q[-1] == 16
    assert params.max_seqlen_q == int(torch.diff(params.cu_seqlens_q).max())

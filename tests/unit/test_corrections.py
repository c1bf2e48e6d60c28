"""rl/corrections.py (MIS, IcePop, DeepSeek-V3.2 off-policy mask) against hand-computed cases.

Guarantees:
- each mask keeps/removes exactly the hand-computed tokens/sequences, in a packed stream and in
  padded rows;
- a removed token leaves the loss numerator *and* its normalizer: after apply_masks + masked_norm
  the GRPO loss equals the hand-computed mean over the kept tokens only (token-mean) and over the
  kept sequences only (seq-mean-token-mean);
- the logged fractions are the hand-computed ones; a mask forces the separate pi_old pass.
"""

import math

import pytest
import torch

from r1_megatron.config.schema import RLConfig
from r1_megatron.rl import corrections
from r1_megatron.rl.loss import fuses_old_logprobs
from r1_megatron.rl.losses import policy_loss
from r1_megatron.train.microbatch import Microbatch

L = math.log


def _packed(old: list[float], roll: list[float], mask: list[float], adv: list[float], cu: list[int]) -> Microbatch:
    """One packed stream with the given per-position values (token ids are irrelevant to the masks)."""
    n = len(old)
    row = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    m = row(mask)
    seg = torch.bucketize(torch.arange(n), torch.tensor(cu[1:]), right=True)
    seq_len = torch.zeros(len(cu) - 1, dtype=torch.float64).index_add_(0, seg, m[0])[seg].clamp(min=1)
    return Microbatch(
        tokens=torch.zeros(1, n, dtype=torch.long), labels=torch.zeros(1, n, dtype=torch.long), loss_mask=m,
        position_ids=torch.arange(n).reshape(1, n), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        extras={"old_logprobs": row(old), "rollout_logprobs": row(roll), "advantages": row(adv),
                "token_seq_len": seq_len[None]})


# Two sequences of 4 positions; the first position of each is a prompt token (mask 0).
# Sequence 0: log(old/roll) = 0.1, 0.3, 0.2 -> mean 0.2 -> geometric-mean ratio e^0.2 = 1.2214.
# Sequence 1: log(old/roll) = -0.1, 0.1, 0.0 -> ratio 1.
OLD = [0.0, -1.0, -1.0, -1.0, 0.0, -2.0, -2.0, -2.0]
ROLL = [0.0, -1.1, -1.3, -1.2, 0.0, -1.9, -2.1, -2.0]
MASK = [0.0, 1, 1, 1, 0.0, 1, 1, 1]
CU = [0, 4, 8]


def test_mis_drops_the_sequence_outside_the_band():
    mb = _packed(OLD, ROLL, MASK, [0.0] * 8, CU)
    old, roll, m, seg = mb.extras["old_logprobs"], mb.extras["rollout_logprobs"], mb.loss_mask, corrections.segment_ids(mb)
    assert corrections.mis_keep(old, roll, m, seg, [0.5, 1.2])[0].tolist() == [False] * 4 + [True] * 4
    assert corrections.mis_keep(old, roll, m, seg, [0.5, 1.23]).all()  # e^0.2 = 1.2214 < 1.23
    assert corrections.mis_keep(old, roll, m, seg, [1.01, 2.0])[0].tolist() == [True] * 4 + [False] * 4


def test_icepop_drops_tokens_outside_the_band():
    ratios = [0.4, 1.0, 6.0, 4.9, 0.5, 5.0]
    old = torch.tensor([L(r) for r in ratios], dtype=torch.float64)
    roll = torch.zeros(6, dtype=torch.float64)
    keep = corrections.icepop_keep(old, roll, torch.ones(6), [0.5, 5.0])
    assert keep.tolist() == [False, True, False, True, True, True]


def test_offpolicy_mask_needs_negative_advantage_and_kl_above_delta():
    # Three sequences of 2 loss tokens; mean log(roll/theta): 0.3, 0.3, 0.1.
    cur = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    roll = torch.tensor([-0.8, -0.6, -0.8, -0.6, -0.9, -0.9], dtype=torch.float64)
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    seg = torch.tensor([0, 0, 1, 1, 2, 2])
    keep = corrections.offpolicy_keep(cur, roll, adv, torch.ones(6), seg, 0.2)
    assert keep.tolist() == [False, False, True, True, True, True]
    assert corrections.offpolicy_keep(cur, roll, adv, torch.ones(6), seg, 0.31).all()


def test_padded_rows_are_sequences():
    mb = Microbatch(tokens=torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 3, dtype=torch.long),
                    loss_mask=torch.ones(2, 3), position_ids=torch.arange(3).expand(2, 3))
    assert corrections.segment_ids(mb).tolist() == [[0, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_removed_tokens_leave_the_normalizer(agg):
    # IcePop [0.5, 5] removes position 2 of sequence 0 (ratio e^2 = 7.4); MIS [0.5, 2] then sees
    # sequence 1's mean log-ratio (1.0 + 1.0 + 0.5) / 3 = 0.833 -> 2.30 > 2: the whole sequence goes.
    old = [0.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, -0.5]
    roll = [0.0, -1.0, -1.0, -1.0, 0.0, -1.0, -1.0, -1.0]
    adv = [0.0, 1.0, 1.0, 2.0, 0.0, -1.0, -1.0, -1.0]
    mb = _packed(old, roll, MASK, adv, CU)
    cfg = RLConfig(icepop=[0.5, 5.0], mis=[0.5, 2.0], kl_coef=0.0, loss_agg=agg)
    metrics = corrections.apply_masks([mb], cfg)
    norm = corrections.masked_norm([mb], max_response_len=3)
    assert mb.loss_mask[0].tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
    assert (norm.num_tokens, norm.num_sequences) == (2, 1)
    assert metrics["icepop_masked_frac"] == pytest.approx(1 / 6)
    assert metrics["mis_masked_frac"] == pytest.approx(3 / 6)
    assert metrics["offpolicy_masks_removed_frac"] == pytest.approx(4 / 6)
    # At ratio 1 (logprobs = old) the per-token loss is -A: the kept tokens are A = 1 and 2.
    lp = mb.extras["old_logprobs"].clone().requires_grad_(True)
    loss, _ = policy_loss(lp, mb.extras["old_logprobs"], mb.extras["advantages"], mb.loss_mask,
                          mb.extras["token_seq_len"], norm, cfg, rollout_logprobs=mb.extras["rollout_logprobs"])
    # token-mean: -(1 + 2) / 2 kept tokens; seq-mean-token-mean: one kept sequence of 2 kept tokens.
    assert float(loss.detach()) == pytest.approx(-1.5)
    loss.backward()
    assert lp.grad[0].nonzero().flatten().tolist() == [1, 3]


def test_masks_force_the_separate_old_logprob_pass():
    assert fuses_old_logprobs(RLConfig())
    assert not fuses_old_logprobs(RLConfig(icepop=[0.5, 5.0]))
    assert not fuses_old_logprobs(RLConfig(offpolicy_mask_delta=0.1))


def test_bad_bounds_name_the_key():
    with pytest.raises(ValueError, match=r"rl.mis: expected \[low, high\]"):
        corrections.mis_keep(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.zeros(2, dtype=torch.long), [2.0, 1.0])

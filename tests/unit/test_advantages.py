"""rl/advantages.py and the group layout of rl/types.py against hand-computed cases.

Guarantees: on a 2-group example with known rewards, every advantage option (mean/std, Dr. GRPO,
leave-one-out with and without std, all-equal flag, overlong penalty / soft penalty / mask,
KL-in-reward) gives the numbers worked out by hand in the comments; groups are found by group_id
whatever the sample order; bad inputs raise a one-line error naming the field.
"""

import math

import pytest
import torch

from r1_megatron.config.schema import RLConfig
from r1_megatron.rl.advantages import (
    all_equal_groups,
    assign_advantages,
    group_advantages,
    kl_in_reward,
    leave_one_out_baseline,
    overlong_penalty,
    per_sequence_sum,
    soft_overlong_penalty,
)
from r1_megatron.rl.types import RolloutBatch, Sample

EPS = 1e-6
# Group 0: [1, 0, 0, 0]: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25],
#   sum of squares 0.5625 + 3 * 0.0625 = 0.75, unbiased var 0.75 / 3 = 0.25, std 0.5.
# Group 1: [3, 1, 1, 3]: mean 2, deviations [1, -1, -1, 1], sum of squares 4, var 4/3, std 2/sqrt(3).
REWARDS = [[1.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 3.0]]
STD1 = 2 / math.sqrt(3)


def _rewards() -> torch.Tensor:
    return torch.tensor(REWARDS, dtype=torch.float64)


def _close(actual: torch.Tensor, expected: list[list[float]], tol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# (r - mean) / (std + eps) from the numbers above.
MEAN_STD = [
    [0.75 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS)],
    [1 / (STD1 + EPS), -1 / (STD1 + EPS), -1 / (STD1 + EPS), 1 / (STD1 + EPS)],
]


def test_mean_std_advantages():
    _close(group_advantages(_rewards(), "mean", std_normalize=True, eps=EPS), MEAN_STD)


def test_dr_grpo_advantages_have_no_std():
    # r - mean: group 0 minus 0.25, group 1 minus 2.
    adv = group_advantages(_rewards(), "mean", std_normalize=False)
    _close(adv, [[0.75, -0.25, -0.25, -0.25], [1.0, -1.0, -1.0, 1.0]])


def test_leave_one_out():
    # Group 0: baselines mean(0,0,0)=0 for i=0, mean(1,0,0)=1/3 for the others -> [1, -1/3, -1/3, -1/3].
    # Group 1: i=0: mean(1,1,3)=5/3 -> 4/3; i=1: mean(3,1,3)=7/3 -> -4/3; symmetric for i=2,3.
    expected = [[1.0, -1 / 3, -1 / 3, -1 / 3], [4 / 3, -4 / 3, -4 / 3, 4 / 3]]
    _close(group_advantages(_rewards(), "leave_one_out", std_normalize=False), expected)
    # With std on, the same divided by the group std (0.5 and 2/sqrt(3)).
    scaled = [[a / (0.5 + EPS) for a in expected[0]], [a / (STD1 + EPS) for a in expected[1]]]
    _close(group_advantages(_rewards(), "leave_one_out", std_normalize=True, eps=EPS), scaled)
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_baseline(torch.ones(2, 1))


def test_all_equal_flag_and_zero_advantage():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert all_equal_groups(r).tolist() == [False, True]
    # std 0 -> 0 / (0 + eps) = 0 for every member of the all-equal group.
    assert group_advantages(r, eps=EPS)[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_overlong_penalty_and_soft_penalty_functions():
    r = torch.tensor([1.0, 0.0, 1.0])
    assert overlong_penalty(r, torch.tensor([True, False, False])).tolist() == [-1.0, 0.0, 1.0]
    # max_len 10, buffer 4: penalty clamp((6 - L) / 4, -1, 0):
    # L=10 -> -1, L=7 -> -0.25, L=8 -> -0.5, L=6 -> 0, L=3 -> 0 (never positive).
    lengths = torch.tensor([10, 7, 8, 6, 3])
    out = soft_overlong_penalty(torch.zeros(5), lengths, max_len=10, buffer=4)
    assert out.tolist() == [-1.0, -0.25, -0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="overlong_buffer"):
        soft_overlong_penalty(torch.zeros(1), torch.tensor([1]), max_len=10, buffer=0)


def _batch(lengths: list[list[int]], truncated: list[list[bool]]) -> RolloutBatch:
    """The 2-group example as Samples, deliberately shuffled so grouping is by id, not order."""
    samples = []
    for g, (rewards, lens, truncs) in enumerate(zip(REWARDS, lengths, truncated)):
        for i, (r, n, t) in enumerate(zip(rewards, lens, truncs)):
            samples.append(
                Sample([1, 2], list(range(3, 3 + n)), [-1.0] * n, 10 + g, i, reward=r, truncated=t)
            )
    order = [5, 0, 7, 2, 1, 6, 3, 4]
    return RolloutBatch([samples[k] for k in order])


def _advantages(batch: RolloutBatch) -> list[list[float]]:
    return [[s.advantage for s in g] for g in batch.groups()]


LENS = [[10, 7, 8, 3], [4, 4, 4, 4]]
NO_TRUNC = [[False] * 4, [False] * 4]
TRUNC0 = [[True, False, False, False], [False] * 4]


def test_groups_follow_group_id_and_sample_index():
    batch = _batch(LENS, NO_TRUNC)
    assert [[s.reward for s in g] for g in batch.groups()] == REWARDS
    idx = batch.group_index()
    assert idx.shape == (2, 4)
    assert [[batch.samples[i].sample_index for i in row] for row in idx.tolist()] == [[0, 1, 2, 3]] * 2
    assert len(batch.select_groups([False, True])) == 4


def test_assign_default_is_mean_std_and_ignores_truncation():
    batch = _batch(LENS, TRUNC0)
    metrics = assign_advantages(batch, RLConfig(adv_eps=EPS), max_response_len=10)
    _close(torch.tensor(_advantages(batch), dtype=torch.float64), MEAN_STD)
    assert metrics["truncation_rate"] == pytest.approx(1 / 8)
    assert metrics["all_equal_frac"] == 0.0


def test_assign_overlong_penalty():
    # Sample 0 of group 0 is truncated: rewards [-1, 0, 0, 0], mean -0.25,
    # deviations [-0.75, 0.25, 0.25, 0.25], std 0.5 (as before) -> [-1.5, 0.5, 0.5, 0.5].
    batch = _batch(LENS, TRUNC0)
    assign_advantages(batch, RLConfig(overlong="penalty", adv_eps=0.0), max_response_len=10)
    adv = _advantages(batch)
    assert adv[0] == pytest.approx([-1.5, 0.5, 0.5, 0.5], abs=1e-12)
    assert adv[1] == pytest.approx([math.sqrt(3) / 2, -math.sqrt(3) / 2, -math.sqrt(3) / 2, math.sqrt(3) / 2])


def test_assign_overlong_soft_penalty():
    # Group 0 lengths [10, 7, 8, 3], max 10, buffer 4 -> penalties [-1, -0.25, -0.5, 0]:
    # shaped rewards [0, -0.25, -0.5, 0], mean -0.1875, deviations [0.1875, -0.0625, -0.3125, 0.1875],
    # squares 0.03515625 + 0.00390625 + 0.09765625 + 0.03515625 = 0.171875, var 0.171875/3.
    # Group 1 lengths are all 4 <= 6: no penalty.
    batch = _batch(LENS, TRUNC0)
    cfg = RLConfig(overlong="soft_penalty", overlong_buffer=4, adv_eps=0.0)
    assign_advantages(batch, cfg, max_response_len=10)
    std = math.sqrt(0.171875 / 3)
    adv = _advantages(batch)
    assert adv[0] == pytest.approx([0.1875 / std, -0.0625 / std, -0.3125 / std, 0.1875 / std], abs=1e-12)
    assert adv[1] == pytest.approx([math.sqrt(3) / 2, -math.sqrt(3) / 2, -math.sqrt(3) / 2, math.sqrt(3) / 2])


def test_assign_overlong_mask():
    # Rewards unchanged (the truncated sample still counts in its group's mean/std: A = [1.5, -0.5, ...]),
    # but its loss mask is zeroed, so it leaves the loss and the sequence count.
    batch = _batch(LENS, TRUNC0)
    assign_advantages(batch, RLConfig(overlong="mask", adv_eps=0.0), max_response_len=10)
    g0 = batch.groups()[0]
    assert [s.advantage for s in g0] == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-12)
    assert g0[0].loss_mask == [0.0] * 10 and g0[1].loss_mask == [1.0] * 7
    norm = batch.loss_norm()
    # 8 sequences minus the masked one; tokens 10+7+8+3+4*4 = 44 minus 10.
    assert (norm.num_sequences, norm.num_tokens, norm.max_response_len) == (7, 34, 10)


def test_assign_kl_in_reward():
    # beta 0.5, sequence k1 of group 0 = [0, 0, 0, -2] -> shaped [1, 0, 0, 0 - 0.5 * (-2)] = [1, 0, 0, 1]:
    # mean 0.5, deviations [0.5, -0.5, -0.5, 0.5], sum of squares 1, var 1/3, std 1/sqrt(3),
    # so A = 0.5 * sqrt(3) * [1, -1, -1, 1]. Group 1 k1 = 0.
    batch = _batch(LENS, NO_TRUNC)
    seq_k1 = torch.zeros(8)
    seq_k1[[s.group_id == 10 and s.sample_index == 3 for s in batch.samples].index(True)] = -2.0
    cfg = RLConfig(kl_in="reward", kl_coef=0.5, adv_eps=0.0)
    assign_advantages(batch, cfg, max_response_len=10, seq_k1=seq_k1)
    h = math.sqrt(3) / 2
    assert _advantages(batch)[0] == pytest.approx([h, -h, -h, h], abs=1e-12)
    with pytest.raises(ValueError, match="seq_k1"):
        assign_advantages(batch, cfg, max_response_len=10)


def test_kl_in_reward_and_per_sequence_sum():
    # Tokens of sequences 0,0,1,-1(padding),1 with k1 values 0.5, 0.25, 1, 9, -3: sums [0.75, -2].
    k1 = torch.tensor([0.5, 0.25, 1.0, 9.0, -3.0])
    sums = per_sequence_sum(k1, torch.tensor([0, 0, 1, -1, 1]), 2)
    assert sums.tolist() == [0.75, -2.0]
    # r - beta * k1 = [1 - 0.1 * 0.75, 0 + 0.1 * 2].
    assert kl_in_reward(torch.tensor([1.0, 0.0]), sums, 0.1).tolist() == pytest.approx([0.925, 0.2])


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="rollout_logprobs has 1 entries, response_ids has 2"):
        Sample([1], [2, 3], [-1.0], group_id=0, sample_index=0)
    with pytest.raises(ValueError, match="loss_mask"):
        Sample([1], [2], [-1.0], group_id=0, sample_index=0, loss_mask=[1.0, 1.0])
    with pytest.raises(KeyError, match="rl.baseline"):
        group_advantages(_rewards(), "median")
    uneven = RolloutBatch([Sample([1], [2], [0.0], g, i) for g, i in [(0, 0), (0, 1), (1, 0)]])
    with pytest.raises(ValueError, match="unequal sizes"):
        uneven.group_index()

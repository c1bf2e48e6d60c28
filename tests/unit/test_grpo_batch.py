"""The GRPO loop's batch plumbing: packed microbatches carry every per-token tensor at the label
position of the token it belongs to, so the loss on packed rows equals the loss on padded rows
(computed by RolloutBatch.to_padded, written independently); minibatches split by whole groups."""

import pytest
import torch

from r1_megatron.config.schema import RLConfig
from r1_megatron.data.packing import best_fit_decreasing
from r1_megatron.parallel.device import single_rank_world
from r1_megatron.rl.batching import microbatches, minibatches, tight_capacity
from r1_megatron.rl.loss import fuses_old_logprobs, grpo_loss
from r1_megatron.rl.rollout_phase import rollout_metrics
from r1_megatron.rl.losses import policy_loss
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.rl.types import RolloutBatch, Sample


def _batch(groups: int = 3, g: int = 4, seed: int = 0) -> RolloutBatch:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(groups):
        prompt = torch.randint(3, 100, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        for j in range(g):
            n = int(torch.randint(1, 12, (1,), generator=gen))
            samples.append(Sample(prompt_ids=prompt, response_ids=torch.randint(3, 100, (n,), generator=gen).tolist(),
                                  rollout_logprobs=(-torch.rand(n, generator=gen)).tolist(), group_id=k,
                                  sample_index=j, reward=float(torch.rand(1, generator=gen)),
                                  advantage=float(torch.randn(1, generator=gen))))
    return RolloutBatch(samples)


@pytest.fixture(scope="module", autouse=True)
def world():
    single_rank_world()


def _fake_logprobs(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A deterministic function of (token, label) standing in for the model's label logprob."""
    return -((tokens * 31 + labels * 7) % 97).float() / 50.0


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_packed_microbatches_give_the_padded_loss(agg):
    batch = _batch()
    cfg = RLConfig(loss_agg=agg, kl_coef=0.0, tis=2.0)
    norm = batch.loss_norm(16)
    padded = batch.to_padded()
    lp_pad = _fake_logprobs(padded.tokens, padded.labels)
    old_pad = lp_pad - 0.1 * padded.advantages  # ratios away from 1 so clipping can act
    want, _ = policy_loss(lp_pad, old_pad, padded.advantages, padded.loss_mask, padded.token_seq_len, norm, cfg,
                          rollout_logprobs=padded.rollout_logprobs)
    mbs = microbatches(batch, capacity=24)
    assert len(mbs) > 1  # several packed rows
    got = 0.0
    for mb in mbs:
        lp = _fake_logprobs(mb.tokens, mb.labels)
        x = mb.extras
        mb.extras["old_logprobs"] = lp - 0.1 * x["advantages"]
        loss, _ = grpo_loss(cfg, norm)(lp, mb)
        got += float(loss)
    assert got == pytest.approx(float(want), abs=1e-6)
    assert sum(float(mb.loss_mask.sum()) for mb in mbs) == batch.num_loss_tokens


def test_extras_sit_on_the_label_positions():
    batch = _batch(groups=1, g=2)
    (mb,) = microbatches(batch, capacity=64)
    for s in batch.samples:
        hits = (mb.extras["advantages"] == s.advantage) & (mb.loss_mask > 0)
        assert int(hits.sum()) == s.response_len
        assert sorted(mb.labels[hits].tolist()) == sorted(s.response_ids)
        lp = mb.extras["rollout_logprobs"][hits]
        assert sorted(lp.tolist()) == pytest.approx(sorted(s.rollout_logprobs))


def test_minibatches_split_whole_groups():
    batch = _batch(groups=4)
    parts = list(minibatches(batch, 2))
    assert [len(p.groups()) for p in parts] == [2, 2]
    assert {s.group_id for s in parts[0].samples}.isdisjoint({s.group_id for s in parts[1].samples})
    with pytest.raises(ValueError, match=r"rl.num_minibatches\(3\) must divide the number of groups \(4\)"):
        list(minibatches(batch, 3))


def test_rollout_metrics_count_components_and_errors():
    batch = _batch(groups=1, g=4)
    for i, s in enumerate(batch.samples):
        s.reward_components = {"accuracy": float(i % 2), "format": 1.0}
        s.reward_error = "timeout" if i == 3 else None
    m = rollout_metrics(batch)
    assert m["accuracy"] == 0.5 and m["format_rate"] == 1.0 and m["reward_error/timeout"] == 1.0


def test_fused_old_logprobs_equal_a_separate_pass_on_the_same_weights():
    """One update per batch: pi_old taken from the training forward gives the loss, metrics and
    gradient that a separate pass computing the same logprobs gives (ratio 1, clipping inactive)."""
    batch = _batch()
    cfg = RLConfig(kl_coef=0.0, tis=2.0)
    assert fuses_old_logprobs(cfg)
    norm = batch.loss_norm(16)
    for mb in microbatches(batch, capacity=24):
        base = _fake_logprobs(mb.tokens, mb.labels)
        fused_lp, separate_lp = base.clone().requires_grad_(), base.clone().requires_grad_()
        fused, fused_m = grpo_loss(cfg, norm)(fused_lp, mb)
        separate_mb = Microbatch(mb.tokens, mb.labels, mb.loss_mask, mb.position_ids, mb.cu_seqlens,
                                 {**mb.extras, "old_logprobs": base.clone()})
        separate, separate_m = grpo_loss(cfg, norm)(separate_lp, separate_mb)
        fused.backward()
        separate.backward()
        assert float(fused.detach()) == float(separate.detach())
        assert {k: float(v) for k, v in fused_m.items()} == {k: float(v) for k, v in separate_m.items()}
        assert torch.equal(fused_lp.grad, separate_lp.grad) and fused_lp.grad.abs().sum() > 0


@pytest.mark.parametrize("knob", [{"num_minibatches": 2}, {"ppo_epochs": 2},
                                  {"old_logprob_pass": "separate"}])
def test_old_logprobs_need_their_own_pass_when_the_batch_makes_several_updates(knob):
    cfg = RLConfig(kl_coef=0.0, **knob)
    assert not fuses_old_logprobs(cfg)
    batch = _batch()
    mb = microbatches(batch, capacity=24)[0]
    match = r"no old_logprobs.*'separate'" if "old_logprob_pass" in knob else r"no old_logprobs.* = 2\)"
    with pytest.raises(ValueError, match=match):
        grpo_loss(cfg, batch.loss_norm(16))(_fake_logprobs(mb.tokens, mb.labels), mb)


def test_tight_capacity_keeps_the_row_count_with_less_padding():
    lengths = [90, 85, 88, 92, 95, 60, 70, 91, 89, 93, 87, 86]  # 1026 tokens: 3 rows of 512
    assert len(best_fit_decreasing(lengths, 512)) == 3
    row = tight_capacity(lengths, 512)
    assert row % 8 == 0 and row < 512
    assert len(best_fit_decreasing(lengths, row)) == 3  # same rows, each shorter
    assert len(best_fit_decreasing(lengths, row - 8)) > 3  # and no shorter row would do
    assert tight_capacity([600, 10], 512) == 600  # a sequence longer than the cap sets the row
    assert tight_capacity([5], 512) == 8

"""Shared-prompt packing (rl.share_prompts, rl/shared_prompts.py): each group's prompt is packed once,
and every response still gets the logprobs, loss and gradient it gets with its own copy of the prompt.

References: the plain packing (microbatches without sharing, itself checked against each
sequence run alone in test_packed_forward.py) on micro_moe, and a forward of each whole sequence
alone. A negative control shows the comparison can fail: with the responses cut off from their
shared prompt, the logprobs move far outside the tolerance.
"""

import dataclasses

import pytest
import torch

from r1_megatron.config.loader import load_config
from r1_megatron.config.schema import RLConfig
from r1_megatron.model.attention import supports_shared_prefix
from r1_megatron.model.provider import forward_logits, mtp_disabled
from r1_megatron.parallel.device import single_rank_world
from r1_megatron.parallel.groups import resolve_layout
from r1_megatron.rl.batching import microbatches
from r1_megatron.rl.loss import grpo_loss
from r1_megatron.rl.shared_prompts import bundles
from r1_megatron.train.trainer import Trainer
from r1_megatron.rl.types import RolloutBatch, Sample

TOL = 1e-5


def _batch(groups: int = 3, g: int = 4, seed: int = 0) -> RolloutBatch:
    """Groups of g responses to one random prompt each; every rollout logprob is distinct, so it
    names its token in any layout."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(groups):
        length = int(torch.randint(3, 12, (1,), generator=gen))
        prompt = torch.randint(3, 100, (length,), generator=gen).tolist()
        for j in range(g):
            n = int(torch.randint(1, 12, (1,), generator=gen))
            samples.append(Sample(
                prompt_ids=prompt, response_ids=torch.randint(3, 100, (n,), generator=gen).tolist(),
                rollout_logprobs=(-torch.rand(n, generator=gen) - 0.01).tolist(), group_id=k, sample_index=j,
                reward=float(torch.rand(1, generator=gen)), advantage=float(torch.randn(1, generator=gen))))
    return RolloutBatch(samples)


@pytest.fixture(scope="module", autouse=True)
def world():
    return single_rank_world(seed=3)


@pytest.fixture(scope="module")
def trainer(world):
    # lr 0 and no expert-bias update: both layouts see the same weights. The seq aux loss is off: it
    # sees each packed row, and the rows differ (the module docstring of rl/shared_prompts.py).
    cfg = load_config("configs/micro_moe_sft.yaml", [
        "optim.lr=0.0", "model.bias_update_rate=0.0", "model.seq_aux_loss_coeff=0.0", "optim.clip_grad=0.0"])
    return Trainer(cfg, resolve_layout(cfg, 1), world)


def _by_token(mbs, logprobs) -> dict[float, float]:
    """{rollout logprob: model logprob} over every loss position."""
    out = {}
    for mb, lp in zip(mbs, logprobs, strict=True):
        hit = mb.loss_mask > 0
        out.update(zip(mb.extras["rollout_logprobs"][hit].tolist(), lp[hit].tolist(), strict=True))
    return out


def test_layout_shares_each_prompt_and_keeps_every_loss_token():
    batch = _batch()
    plain, shared = microbatches(batch, 64), microbatches(batch, 64, share_prompts=True)
    saved = sum((len(g[0].prompt_ids) - 1) * (len(g) - 1) for g in batch.groups())
    whole = sum(len(s.prompt_ids) + s.response_len for s in batch.samples)
    assert sum(len(b) for b in bundles(batch, 1000)) == whole - saved  # one row: one prompt copy per group
    assert sum(len(b) for b in bundles(batch, 64)) >= whole - saved
    assert sum(mb.shape[1] for mb in shared) < sum(mb.shape[1] for mb in plain)
    for mbs in (plain, shared):
        assert sum(float(mb.loss_mask.sum()) for mb in mbs) == batch.num_loss_tokens
    # One group: [prompt[:-1]] then per response [prompt[-1], response], rope positions continuing.
    group = _batch(groups=1, g=3)
    prompt = group.samples[0].prompt_ids
    (mb,) = microbatches(group, 64, share_prompts=True)
    cu, prefix = mb.cu_seqlens.tolist(), mb.segment_prefix.tolist()
    assert prefix[:4] == [-1, 0, 0, 0] and cu[1] == len(prompt) - 1
    assert mb.tokens[0, : cu[1]].tolist() == prompt[:-1]
    for s, a, b in zip(group.samples, cu[1:4], cu[2:5], strict=True):
        assert mb.tokens[0, a:b].tolist() == [prompt[-1], *s.response_ids]
        assert mb.position_ids[0, a:b].tolist() == list(range(len(prompt) - 1, len(prompt) + s.response_len))
        assert mb.labels[0, a : b - 1].tolist() == s.response_ids


def test_a_group_too_long_for_one_row_splits_into_bundles_each_with_the_prompt():
    batch = _batch(groups=1, g=4)
    need = max(len(s.prompt_ids) + s.response_len for s in batch.samples)
    parts = bundles(batch, need + 2)
    assert len(parts) > 1 and all(len(b) <= need + 2 and b.has_prefix for b in parts)
    assert sum(len(b.segments) - 1 for b in parts) == 4
    with pytest.raises(ValueError, match=r"has \d+ tokens > row capacity \d+ \(data.seq_length\)"):
        bundles(batch, need - 1)


def test_shared_prompt_logprobs_equal_plain_packing_and_the_sequence_alone(trainer):
    batch = _batch()
    plain, shared = microbatches(batch, 48), microbatches(batch, 48, share_prompts=True)
    want = _by_token(plain, trainer.forward_logprobs(plain))
    got = _by_token(shared, trainer.forward_logprobs(shared))
    assert got.keys() == want.keys() and len(got) == batch.num_loss_tokens
    assert max(abs(got[k] - want[k]) for k in want) <= TOL
    s = batch.samples[5]  # and one sequence on its own, through megatron's plain (unpacked) path
    with torch.no_grad():
        logits = forward_logits(trainer.unwrapped.eval(), torch.tensor([s.prompt_ids + s.response_ids]))[0]
    predicting = logits.log_softmax(-1)[len(s.prompt_ids) - 1 : -1]  # the positions that predict the response
    alone = predicting.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
    assert max(abs(got[k] - float(v)) for k, v in zip(s.rollout_logprobs, alone, strict=True)) <= TOL


def test_yarn_rope_positions_follow_the_shared_prompt(world):
    """micro_moe with YaRN (DeepSeek-V3's rope: the rotary module also returns an mscale)."""
    cfg = load_config("configs/micro_moe_sft.yaml", ["model.yarn_factor=4.0",
                                                     "model.original_max_position=16"])
    yarn = Trainer(cfg, resolve_layout(cfg, 1), world, for_training=False)
    batch = _batch(seed=2)
    plain, shared = microbatches(batch, 48), microbatches(batch, 48, share_prompts=True)
    want = _by_token(plain, yarn.forward_logprobs(plain))
    got = _by_token(shared, yarn.forward_logprobs(shared))
    assert got.keys() == want.keys() and max(abs(got[k] - want[k]) for k in want) <= TOL


def test_negative_control_responses_cut_off_from_their_prompt_differ(trainer):
    batch = _batch()
    plain, shared = microbatches(batch, 48), microbatches(batch, 48, share_prompts=True)
    want = _by_token(plain, trainer.forward_logprobs(plain))
    cut = [dataclasses.replace(mb, segment_prefix=torch.full_like(mb.segment_prefix, -1)) for mb in shared]
    got = _by_token(cut, trainer.forward_logprobs(cut))
    assert max(abs(got[k] - want[k]) for k in want) > 100 * TOL


def test_train_step_loss_metrics_and_gradient_equal_plain_packing(trainer):
    batch = _batch(groups=4, g=4, seed=1)
    cfg = RLConfig(kl_coef=0.0)
    results = {}
    for share in (False, True):
        mbs = microbatches(batch, 48, share_prompts=share)
        with mtp_disabled(trainer.unwrapped):  # as the loop runs it (rl/loop.py)
            metrics = trainer.train_step(mbs, grpo_loss(cfg, batch.loss_norm(16)))
        grads = torch.cat([p.main_grad.reshape(-1).clone() for p in trainer.unwrapped.parameters()])
        results[share] = metrics, grads
    (m0, g0), (m1, g1) = results[False], results[True]
    assert g0.abs().max() > 0
    assert (g1 - g0).abs().max() <= TOL * g0.abs().max()
    assert m0.keys() == m1.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k


def test_models_without_the_local_mla_cannot_share_prompts(trainer):
    from r1_megatron.config.loader import load_card
    from r1_megatron.model.provider import build_model

    assert supports_shared_prefix(trainer.unwrapped)
    dense = build_model(load_card("qwen2_tiny"))
    assert not supports_shared_prefix(dense)

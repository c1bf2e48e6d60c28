"""One-step-off-policy rollout (rollout.async: one_step): the config refuses it without a TIS cap or
with colocated engines, and the loss on a fixed stale batch equals the decoupled objective computed
by hand (plain floats, token by token):

  L = sum_i 1/(N |o_i|) sum_t min(pi_old/pi_rollout, C) * max(-A_i r_t, -A_i clip(r_t, 1-eps, 1+eps)),
  r_t = pi_theta/pi_old, with pi_old the trainer's recomputed (proximal) policy and pi_rollout the
  stale engine's."""

import math

import pytest
import torch

from r1_megatron.config import load_config
from r1_megatron.config.loader import ConfigError
from r1_megatron.config.schema import RLConfig
from r1_megatron.parallel.device import single_rank_world
from r1_megatron.rl.batching import microbatches
from r1_megatron.rl.loss import grpo_loss
from r1_megatron.rl.async_rollout import staleness_metrics
from r1_megatron.rl.types import RolloutBatch, Sample

CAP, EPS = 1.5, 0.2


def _old(prev: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The proximal policy's label logprob, a fixed function of (input token, label)."""
    return -((prev * 13 + label * 5) % 41).float() / 20.0 - 0.05


def _new(prev: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The policy being trained: pi_old moved by up to +-0.4 nats, so the clip acts on some tokens."""
    return _old(prev, label) + ((prev + 3 * label) % 9 - 4).float() / 10.0


def _batch() -> RolloutBatch:
    prompts = [[5, 9, 14], [21, 8]]
    responses = [[[30, 31, 7], [12]], [[40, 2], [17, 18, 19, 20]]]
    samples = []
    for k, (prompt, group) in enumerate(zip(prompts, responses, strict=True)):
        for j, resp in enumerate(group):
            seq = torch.tensor(prompt + resp)
            old = _old(seq[len(prompt) - 1 : -1], seq[len(prompt) :])
            # The stale engine's logprobs: off pi_old by -0.6..+0.6, so the TIS cap bites on some tokens.
            roll = (old + torch.tensor([0.6, -0.3, 0.1, -0.6][: len(resp)])).tolist()
            samples.append(Sample(prompt_ids=prompt, response_ids=resp, rollout_logprobs=roll, group_id=k,
                                  sample_index=j, advantage=[1.0, -0.5, 0.7, -1.2][2 * k + j], policy_version=3))
    return RolloutBatch(samples)


def _hand_loss(batch: RolloutBatch) -> float:
    total = 0.0
    for s in batch.samples:
        seq = s.prompt_ids + s.response_ids
        p = len(s.prompt_ids)
        for t, label in enumerate(s.response_ids):
            prev = seq[p - 1 + t]
            old = float(_old(torch.tensor(prev), torch.tensor(label)))
            new = float(_new(torch.tensor(prev), torch.tensor(label)))
            w = min(math.exp(old - s.rollout_logprobs[t]), CAP)
            r = math.exp(new - old)
            a = s.advantage
            total += w * max(-a * r, -a * min(max(r, 1 - EPS), 1 + EPS)) / (len(batch.samples) * len(s.response_ids))
    return total


def test_decoupled_loss_equals_the_hand_computed_one():
    single_rank_world()
    batch = _batch()
    cfg = RLConfig(tis=CAP, clip_eps_low=EPS, clip_eps_high=EPS, kl_coef=0.0, loss_agg="seq-mean-token-mean")
    norm = batch.loss_norm(16)
    got, capped = 0.0, 0.0
    for mb in microbatches(batch, capacity=16):
        mb.extras["old_logprobs"] = _old(mb.tokens, mb.labels)  # what the trainer recomputes
        loss, metrics = grpo_loss(cfg, norm)(_new(mb.tokens, mb.labels), mb)
        got += float(loss)
        capped += float(metrics["tis_clipped_frac_sum"])
    assert capped > 0  # the cap is active on some tokens, so the test covers the truncation
    assert got == pytest.approx(_hand_loss(batch), abs=1e-6)
    assert staleness_metrics(batch, 4) == {"async/staleness_mean": 1.0, "async/staleness_min": 1.0,
                                           "async/staleness_max": 1.0}


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.placement=separate", "rollout.async=one_step"], r"^rollout.async=one_step needs a TIS cap rl.tis"),
    (["rl.tis=2.0", "rollout.async=one_step"], r"^rollout.async=one_step needs rollout.placement=separate"),
    (["rollout.placement=separate", "rollout.engines=0"], r"^rollout.engines\(0\) must be >= 1$"),
])
def test_async_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("configs/demo_cpu.yaml", overrides)
    assert "\n" not in str(err.value)


def test_async_key_round_trips():
    from r1_megatron.config.loader import from_dict, to_dict
    from r1_megatron.config.schema import JobConfig

    cfg = load_config("configs/demo_cpu.yaml", ["rollout.placement=separate", "rollout.async=one_step", "rl.tis=2"])
    data = to_dict(cfg)
    assert data["rollout"]["async"] == "one_step" and "async_" not in data["rollout"]
    assert from_dict(JobConfig, data) == cfg
    # YAML reads a bare `off` as False; the switch takes it as "off".
    assert load_config("configs/demo_cpu.yaml", ["rollout.async=off"]).rollout.async_ == "off"

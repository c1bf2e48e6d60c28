"""rl/losses.py against hand-computed values and closed-form gradients, and the global-normalization contract.

Guarantees:
- the clipped surrogate's value and d loss / d logprob match the analytic values for clip active and
  inactive, A > 0 and A < 0, and the dual clip; k1/k2/k3 and their gradients match the closed forms;
- each aggregation mode gives the hand-computed mean; TIS weights, clipped fraction and mismatch
  metrics match a hand-computed case; entropy matches -sum p log p;
- the padded layout puts response token j's label at position P + j - 1;
- splitting a batch 1, 2 or 4 ways (unequal lengths, padded per microbatch) or packing it into rows
  gives the unsplit gradient within 1e-6 in every aggregation mode, with KL, TIS, dual clip and
  entropy on; per-microbatch normalization (the bug this guards against) does not.
"""

import math
import random

import pytest
import torch

from r1_megatron.config.schema import RLConfig
from r1_megatron.rl.advantages import assign_advantages
from r1_megatron.rl.losses import (
    entropy_from_logits,
    finalize_metrics,
    kl_k1,
    kl_k2,
    kl_k3,
    policy_loss,
    sum_metrics,
)
from r1_megatron.rl.types import LossNorm, RolloutBatch, Sample, sequence_tensors

ONE = LossNorm(num_tokens=1, num_sequences=1, max_response_len=1)
AGG_MODES = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def _one_token(ratio: float, adv: float, **cfg_kw) -> tuple[float, float, dict]:
    """Loss, d loss / d logprob and metrics for one token with weight 1 (old logprob 0, new = ln ratio)."""
    cfg = RLConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0, loss_agg="token-mean", **cfg_kw)
    new = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    one = torch.ones(1, dtype=torch.float64)
    adv_t = torch.tensor([adv], dtype=torch.float64)
    loss, metrics = policy_loss(new, torch.zeros_like(one), adv_t, one, one, ONE, cfg)
    loss.backward()
    return loss.item(), new.grad.item(), finalize_metrics(metrics)


# (ratio, A, dual c, expected loss, expected d loss / d logprob, clipped, dual-clipped),
# with eps_low 0.2 and eps_high 0.28.
# d(-A * rho)/d logprob = -A * rho when the unclipped branch is taken; 0 when a bound is active.
CLIP_CASES = [
    (1.1, 2.0, None, -2.2, -2.2, 0, 0),  # inside [0.8, 1.28]: -A*rho = -2.2
    (1.5, 2.0, None, -2.56, 0.0, 1, 0),  # A>0, rho above 1.28: -2 * 1.28, clipped
    (0.5, 2.0, None, -1.0, -1.0, 0, 0),  # A>0, rho below 0.8: min(1.0, 1.6) = rho*A, not clipped
    (0.5, -1.0, None, 0.8, 0.0, 1, 0),  # A<0, rho below 0.8: -min(-0.5, -0.8) = 0.8, clipped
    (1.5, -1.0, None, 1.5, 1.5, 0, 0),  # A<0, rho above 1.28: -min(-1.5, -1.28) = 1.5, grad -A*rho
    (4.0, -1.0, 3.0, 3.0, 0.0, 0, 1),  # dual: loss 4 bounded by -c*A = 3, grad 0
    (2.5, -1.0, 3.0, 2.5, 2.5, 0, 0),  # dual bound 3 not reached: loss 2.5, grad 2.5
    (4.0, 2.0, 3.0, -2.56, 0.0, 1, 0),  # dual clip does not touch A>0: upper clip, -2 * 1.28
]


@pytest.mark.parametrize("ratio,adv,c,loss_want,grad_want,clipped,dual", CLIP_CASES)
def test_clipped_surrogate_value_and_gradient(ratio, adv, c, loss_want, grad_want, clipped, dual):
    loss, grad, m = _one_token(ratio, adv, dual_clip_c=c)
    assert loss == pytest.approx(loss_want, abs=1e-12)
    assert grad == pytest.approx(grad_want, abs=1e-12)
    assert (m["clip_frac"], m["dual_clip_frac"]) == (clipped, dual)


# new = -1.0, ref = -1.5: k1 = new - ref = 0.5 (d/dnew = 1);
# k2 = 0.5 * 0.25 = 0.125 (d/dnew = new - ref = 0.5);
# k3 = exp(ref - new) - (ref - new) - 1 = exp(-0.5) + 0.5 - 1 (d/dnew = 1 - exp(-0.5)).
KL_CASES = [("k1", 0.5, 1.0), ("k2", 0.125, 0.5), ("k3", math.exp(-0.5) - 0.5, 1 - math.exp(-0.5))]


def test_kl_estimators_and_gradients_closed_form():
    for fn, (_, value, grad) in zip([kl_k1, kl_k2, kl_k3], KL_CASES):
        new = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
        d = fn(new, torch.tensor(-1.5, dtype=torch.float64))
        d.backward()
        assert d.item() == pytest.approx(value, abs=1e-12)
        assert new.grad.item() == pytest.approx(grad, abs=1e-12)
    # k3 >= 0 everywhere and 0 exactly at new == ref.
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    assert (kl_k3(x, x.flip(0)) >= 0).all() and kl_k3(x, x).abs().max() == 0


@pytest.mark.parametrize("est,value,grad", KL_CASES)
def test_kl_in_loss_adds_beta_times_d(est, value, grad):
    # With A = 0 the surrogate is 0 with zero gradient, so loss = beta * D and d loss = beta * D'.
    beta = 0.1
    cfg = RLConfig(kl_coef=beta, kl_estimator=est, kl_in="loss", loss_agg="token-mean")
    new = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    one = torch.ones(1, dtype=torch.float64)
    ref = torch.tensor([-1.5], dtype=torch.float64)
    loss, m = policy_loss(new, new.detach().clone(), 0 * one, one, one, ONE, cfg, ref_logprobs=ref)
    loss.backward()
    assert loss.item() == pytest.approx(beta * value, abs=1e-12)
    assert new.grad.item() == pytest.approx(beta * grad, abs=1e-12)
    assert finalize_metrics(m)["kl"] == pytest.approx(value, abs=1e-12)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(new, new.detach(), one, one, one, ONE, cfg)


def _two_sequences(mode: str, max_len: int = 4) -> float:
    """Sequence a: 1 token, A = 2; sequence b: 3 tokens, A = -1; rho = 1, so l = -A per token.

    Flat layout with a padding token between them (mask 0, garbage logprob -inf).
    """
    new = torch.tensor([-0.3, float("-inf"), -1.0, -2.0, -0.5], dtype=torch.float64)
    adv = torch.tensor([2.0, 0.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    seq_len = torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    norm = LossNorm(num_tokens=4, num_sequences=2, max_response_len=max_len)
    loss, _ = policy_loss(new, new.clone(), adv, mask, seq_len, norm, RLConfig(kl_coef=0.0, loss_agg=mode))
    return loss.item()


def test_aggregation_modes_hand_computed():
    # per-token losses: a: [-2]; b: [1, 1, 1].
    # seq-mean-token-mean: (1/2) * (-2/1 + 3/3) = -0.5
    # token-mean: (-2 + 3) / 4 = 0.25
    # seq-mean-token-sum-norm: (-2 + 3) / (2 * 4) = 0.125
    assert _two_sequences("seq-mean-token-mean") == pytest.approx(-0.5, abs=1e-12)
    assert _two_sequences("token-mean") == pytest.approx(0.25, abs=1e-12)
    assert _two_sequences("seq-mean-token-sum-norm") == pytest.approx(0.125, abs=1e-12)
    with pytest.raises(KeyError, match="rl.loss_agg"):
        _two_sequences("sum")


def test_tis_hand_computed():
    # old - rollout = [ln 0.5, 0, ln 3, ln 1.5]; cap 2 -> weights [0.5, 1, 2, 1.5]; only ln 3 clipped: 1/4.
    # rho = 1 and A = 1: l = -1 per token, token-mean over 4: loss = -(0.5 + 1 + 2 + 1.5) / 4 = -1.25;
    # d loss / d new_t = -A * rho * w_t / 4 = -w_t / 4.
    diff = [math.log(0.5), 0.0, math.log(3.0), math.log(1.5)]
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    rollout = old - torch.tensor(diff, dtype=torch.float64)
    new = old.clone().requires_grad_(True)
    ones = torch.ones(4, dtype=torch.float64)
    cfg = RLConfig(tis=2.0, kl_coef=0.0, loss_agg="token-mean")
    norm = LossNorm(num_tokens=4, num_sequences=1, max_response_len=4)
    loss, m = policy_loss(new, old, ones, ones, 4 * ones, norm, cfg, rollout_logprobs=rollout)
    loss.backward()
    assert loss.item() == pytest.approx(-1.25, abs=1e-12)
    assert new.grad.tolist() == pytest.approx([-0.125, -0.25, -0.5, -0.375], abs=1e-12)
    f = finalize_metrics(m)
    assert f["tis_clipped_frac"] == 0.25
    assert f["tis_weight"] == pytest.approx(5.0 / 4)
    # mismatch: mean |old - rollout| = (ln 2 + 0 + ln 3 + ln 1.5) / 4; k3(vllm || old) per token is
    # exp(x) - x - 1 with x = old - rollout.
    assert f["mismatch_abs"] == pytest.approx((math.log(2) + math.log(3) + math.log(1.5)) / 4, abs=1e-12)
    k3 = [0.5 - math.log(0.5) - 1, 0.0, 3 - math.log(3) - 1, 1.5 - math.log(1.5) - 1]
    assert f["mismatch_k3"] == pytest.approx(sum(k3) / 4, abs=1e-12)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(new, old, ones, ones, ones, norm, cfg)


def test_entropy_closed_form_and_bonus():
    # uniform over 4: ln 4; p = [0.5, 0.25, 0.25]: -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.5 ln 2.
    uniform = entropy_from_logits(torch.zeros(4, dtype=torch.float64))
    assert uniform.item() == pytest.approx(math.log(4), abs=1e-12)
    logits = torch.tensor([math.log(2), 0.0, 0.0], dtype=torch.float64)
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), abs=1e-12)
    # The bonus: with A = 0 the loss is -coef * H.
    cfg = RLConfig(kl_coef=0.0, entropy_coef=0.01, loss_agg="token-mean")
    one = torch.ones(1, dtype=torch.float64)
    loss, m = policy_loss(-one, -one, 0 * one, one, one, ONE, cfg, logits=logits[None])
    assert loss.item() == pytest.approx(-0.01 * 1.5 * math.log(2), abs=1e-12)
    assert finalize_metrics(m)["entropy"] == pytest.approx(1.5 * math.log(2), abs=1e-12)


def test_padded_layout_aligns_labels_with_response_tokens():
    a = Sample([5, 6, 7], [8, 9], [-0.1, -0.2], group_id=0, sample_index=0, advantage=1.5)
    b = Sample([5], [4, 3, 2], [-0.3, -0.4, -0.5], 0, 1, advantage=-1.5, loss_mask=[1, 0, 1])
    pb = RolloutBatch([a, b]).to_padded(pad_id=0)
    # a: tokens 5 6 7 8 9, position t predicts t+1; response tokens 8, 9 are predicted at positions 2, 3.
    assert pb.tokens.tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert pb.labels.tolist() == [[6, 7, 8, 9, 0], [4, 3, 2, 0, 0]]
    assert pb.loss_mask.tolist() == [[0, 0, 1, 1, 0], [1, 0, 1, 0, 0]]
    want = torch.tensor([[0, 0, -0.1, -0.2, 0], [-0.3, -0.4, -0.5, 0, 0]])
    torch.testing.assert_close(pb.rollout_logprobs, want)
    assert pb.advantages.tolist() == [[0, 0, 1.5, 1.5, 0], [-1.5, -1.5, -1.5, 0, 0]]
    # b has 2 loss tokens (one masked); padding carries 1.
    assert pb.token_seq_len.tolist() == [[2] * 5, [2, 2, 2, 2, 1]]
    assert pb.attention_mask.tolist() == [[True] * 5, [True] * 4 + [False]]


# --- microbatch / DP / packing invariance -------------------------------------------------------

V = 11


class Bigram(torch.nn.Module):
    """logits[t] = W[tokens[t]]: a per-position model, so padded and packed rows give the same values."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w[tokens]
        return torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0], logits


def _setup() -> tuple[RolloutBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    w = torch.randn(V, V, generator=gen, dtype=torch.float64)
    w_old = w + 0.4 * torch.randn(V, V, generator=gen, dtype=torch.float64)  # rho far from 1: clipping acts
    w_ref = w + 0.2 * torch.randn(V, V, generator=gen, dtype=torch.float64)
    old_logp = torch.log_softmax(w_old, -1)
    samples = []
    for g in range(2):
        for i in range(4):
            prompt = [rng.randrange(V) for _ in range(rng.randint(1, 4))]
            resp = [rng.randrange(V) for _ in range(rng.randint(1, 9))]
            seq = prompt + resp
            old = [old_logp[seq[len(prompt) - 1 + j], seq[len(prompt) + j]].item() for j in range(len(resp))]
            rollout = [x + 0.3 * rng.gauss(0, 1) for x in old]
            reward = rng.choice([0.0, 1.0, 0.5])
            samples.append(Sample(prompt, resp, rollout, g, i, reward=reward, truncated=len(resp) == 9))
    batch = RolloutBatch(samples)
    assign_advantages(batch, RLConfig(), max_response_len=9)
    return batch, w, w_old, w_ref


def _cfg(mode: str) -> RLConfig:
    return RLConfig(
        loss_agg=mode,
        kl_coef=0.1,
        kl_estimator="k3",
        tis=1.5,
        dual_clip_c=3.0,
        entropy_coef=0.01,
        clip_eps_high=0.28,
    )


def _microbatch_grad(rows: list[dict], norm: LossNorm, cfg: RLConfig, w, w_old, w_ref) -> tuple:
    """Accumulate gradients over microbatches as a train step would: backward each loss, sum grads."""
    model, old_model, ref_model = Bigram(w), Bigram(w_old), Bigram(w_ref)
    parts = []
    for r in rows:
        logp, logits = model(r["tokens"], r["labels"])
        with torch.no_grad():
            old, _ = old_model(r["tokens"], r["labels"])
            ref, _ = ref_model(r["tokens"], r["labels"])
        loss, m = policy_loss(
            logp, old, r["advantages"], r["loss_mask"], r["token_seq_len"], norm, cfg,
            ref_logprobs=ref, rollout_logprobs=r["rollout_logprobs"], logits=logits,
        )  # fmt: skip
        loss.backward()
        parts.append(m)
    return model.w.grad, sum_metrics(parts)


FIELDS = ("tokens", "labels", "loss_mask", "advantages", "rollout_logprobs", "token_seq_len")


def _padded_rows(batch: RolloutBatch, ways: int) -> list[dict]:
    """Split the samples into `ways` contiguous microbatches, each padded to its own longest row."""
    n = len(batch) // ways
    out = []
    for k in range(ways):
        pb = RolloutBatch(batch.samples[k * n : (k + 1) * n]).to_padded(dtype=torch.float64)
        out.append({f: getattr(pb, f) for f in FIELDS})
    return out


def _packed_rows(batch: RolloutBatch, capacity: int) -> list[dict]:
    """Greedy packing: whole sequences concatenated into [1, <= capacity] rows."""
    rows, cur = [], []
    for s in batch.samples:
        q = sequence_tensors(s, dtype=torch.float64)
        if cur and sum(len(c.tokens) for c in cur) + len(q.tokens) > capacity:
            rows.append(cur)
            cur = []
        cur.append(q)
    rows.append(cur)
    return [{f: torch.cat([getattr(c, f) for c in row])[None] for f in FIELDS} for row in rows]


@pytest.mark.parametrize("mode", AGG_MODES)
def test_split_and_packed_gradients_equal_unsplit(mode):
    batch, w, w_old, w_ref = _setup()
    norm = batch.loss_norm(max_response_len=9)
    cfg = _cfg(mode)
    full_grad, full_m = _microbatch_grad(_padded_rows(batch, 1), norm, cfg, w, w_old, w_ref)
    assert full_grad.abs().max() > 1e-3
    full = finalize_metrics(full_m)
    assert 0 < full["clip_frac"] < 1 and 0 < full["tis_clipped_frac"] < 1  # the bounds are exercised
    packed16, packed30 = _packed_rows(batch, 16), _packed_rows(batch, 30)
    assert len(packed30) < len(packed16) < len(batch)  # rows hold several sequences
    variants = [_padded_rows(batch, 2), _padded_rows(batch, 4), packed16, packed30]
    for rows in variants:
        grad, m = _microbatch_grad(rows, norm, cfg, w, w_old, w_ref)
        torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=0)
        split = finalize_metrics(m)
        assert split.keys() == full.keys()
        for key in full:
            assert split[key] == pytest.approx(full[key], abs=1e-9), key


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_per_microbatch_normalization_would_differ(mode):
    # The negative control: microbatches of 1, 3 and 4 sequences, each normalized by its own counts
    # and averaged (megatron's default), change the gradient, so the invariance test above can fail.
    batch, w, w_old, w_ref = _setup()
    cfg = _cfg(mode)
    full_grad, _ = _microbatch_grad(_padded_rows(batch, 1), batch.loss_norm(9), cfg, w, w_old, w_ref)
    wrong = torch.zeros_like(full_grad)
    for lo, hi in [(0, 1), (1, 4), (4, 8)]:
        sub = RolloutBatch(batch.samples[lo:hi])
        g, _ = _microbatch_grad(_padded_rows(sub, 1), sub.loss_norm(9), cfg, w, w_old, w_ref)
        wrong += g / 3
    assert (wrong - full_grad).abs().max() > 1e-3

"""Policy entropy through the trainer (train/entropy.py, Trainer.train_step(entropy=True), grpo_loss).

Guarantees, at world size 1 (tests/dist/test_entropy_layouts.py covers tp2, pp2, tp2 x pp2):
- `vocab_parallel_entropy` gives the hand-computed H and dH/dx of a two-token case, and equals a full
  torch.log_softmax reference in value and in autograd gradient (float64 gradcheck too);
- the entropy the trainer hands to the loss equals a full-softmax reference computed from the output
  layer's logits by a hook of the test's own (1e-5), and the logged `entropy` is its response-token mean;
- rl.entropy_coef > 0 changes the output layer's weight gradient by exactly -coef * sum_t w_t
  (dH_t/dlogits_t) h_t^T, with dH/dx = -p (log p + H) computed from the captured logits and hiddens;
- the loss with rl.entropy_coef > 0 is split-invariant: one, two or four rows per microbatch give the
  same loss, entropy and gradient (1e-5);
- a negative rl.entropy_coef (which the loss would ignore) is a config error naming the key.
"""

import math

import pytest
import torch

from r1_megatron.config import ConfigError
from r1_megatron.config.loader import load_config
from r1_megatron.config.schema import RLConfig
from r1_megatron.model.provider import mtp_disabled
from r1_megatron.parallel.device import single_rank_world
from r1_megatron.parallel.groups import resolve_layout
from r1_megatron.rl.batching import microbatches
from r1_megatron.rl.loss import grpo_loss
from r1_megatron.train.entropy import vocab_parallel_entropy
from r1_megatron.rl.losses import entropy_from_logits, finalize_metrics, policy_loss
from r1_megatron.train.trainer import Trainer
from r1_megatron.rl.types import LossNorm
from tests.unit.test_shared_prompts import _batch  # groups of G random responses to random prompts

TOL = 1e-5


def test_hand_checked_two_token_case():
    # x = (0, ln 3): p = (1/4, 3/4), H = ln 4 - (3/4) ln 3, dH/dx = -p (log p + H) = (3/16 ln 3, -3/16 ln 3).
    x = torch.tensor([0.0, math.log(3)], dtype=torch.float64, requires_grad=True)
    h = vocab_parallel_entropy(x)
    assert h.item() == pytest.approx(math.log(4) - 0.75 * math.log(3), abs=1e-12)
    h.backward()
    want = [3 / 16 * math.log(3), -3 / 16 * math.log(3)]
    assert x.grad.tolist() == pytest.approx(want, abs=1e-12)
    # Through the loss: with A = 0 and token-mean over one token, the loss is -c * H (the policy term
    # does not see the logits), so entropy_coef c gives the logits the gradient -c * dH/dx.
    cfg = RLConfig(kl_coef=0.0, entropy_coef=0.3, loss_agg="token-mean")
    one = torch.ones(1, dtype=torch.float64)
    x.grad = None
    entropy = vocab_parallel_entropy(x[None])
    loss, _ = policy_loss(-one, -one, 0 * one, one, one, LossNorm(1, 1, 1), cfg, entropy=entropy)
    loss.backward()
    assert x.grad.tolist() == pytest.approx([-0.3 * g for g in want], abs=1e-12)


def test_equals_full_softmax_reference_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 17, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    weights = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    ours = vocab_parallel_entropy(logits)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = entropy_from_logits(logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert (ours - ref).abs().max() < 1e-12
    assert (g_ours - g_ref).abs().max() < 1e-12
    small = torch.randn(2, 6, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(vocab_parallel_entropy, (small,))
    # fp32 input, large logits: no overflow, and the fp32 answer keeps to the float64 one.
    big = logits.detach().float() * 50
    assert (vocab_parallel_entropy(big).double() - entropy_from_logits(big.double())).abs().max() < 1e-4


def test_a_negative_entropy_coef_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rl.entropy_coef\(-0.1\) must be >= 0"):
        load_config("configs/micro_moe_sft.yaml", ["rl.entropy_coef=-0.1"])


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer():
    device = single_rank_world(seed=5)
    # lr 0, no expert-bias update, no clipping: every step sees the same weights, and main_grad is
    # the raw gradient of the summed objective. No seq aux loss: megatron takes it per packed row and
    # averages it per microbatch, so it is not split-invariant (train/trainer.py docstring).
    cfg = load_config("configs/micro_moe_sft.yaml", [
        "optim.lr=0.0", "model.bias_update_rate=0.0", "optim.clip_grad=0.0", "model.seq_aux_loss_coeff=0.0"])
    return Trainer(cfg, resolve_layout(cfg, 1), device)


class _Recorder:
    """A test-owned hook on the output layer: its input hiddens and a copy of its logits (taken before
    megatron's cross entropy rewrites them in place), as [b, s, ...] per microbatch."""

    def __init__(self, model):
        self.hidden, self.logits = [], []
        self.handle = model.output_layer.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.hidden.append(args[0].detach().transpose(0, 1).double())
        self.logits.append(output[0].detach().transpose(0, 1).double())


def _step(trainer, mbs, cfg, norm, record=False):
    """One train_step with the GRPO loss; returns (metrics, main_grads, entropies the loss got, recorder)."""
    seen = []
    loss = grpo_loss(cfg, norm)

    def loss_fn(logprobs, mb, entropy=None):
        seen.append(entropy.detach().double())
        return loss(logprobs, mb, entropy=entropy)

    recorder = _Recorder(trainer.unwrapped) if record else None
    try:
        with mtp_disabled(trainer.unwrapped):
            metrics = trainer.train_step(mbs, loss_fn, entropy=True)
    finally:
        if recorder is not None:
            recorder.handle.remove()
    grads = {n: p.main_grad.clone() for n, p in trainer.unwrapped.named_parameters()}
    return metrics, grads, seen, recorder


def test_trainer_entropy_equals_full_softmax_and_is_logged(trainer):
    batch = _batch()
    mbs = microbatches(batch, 32)
    metrics, _, seen, rec = _step(trainer, mbs, RLConfig(kl_coef=0.0), batch.loss_norm(16), record=True)
    assert len(seen) == len(rec.logits) == len(mbs) > 1
    total, count = 0.0, 0.0
    for mb, got, logits in zip(mbs, seen, rec.logits, strict=True):
        want = entropy_from_logits(logits)
        assert got.shape == want.shape == mb.tokens.shape
        assert (got - want).abs().max() <= TOL
        mask = mb.loss_mask > 0
        total, count = total + want[mask].sum().item(), count + mask.sum().item()
    assert count == batch.num_loss_tokens
    assert finalize_metrics(metrics)["entropy"] == pytest.approx(total / count, abs=TOL)
    assert 0.5 * math.log(512) < total / count <= math.log(512)  # an untrained model: near uniform


def test_entropy_coef_changes_the_gradient_by_the_analytic_entropy_gradient(trainer):
    batch = _batch(seed=1)
    # A large coefficient: near uniform, an untrained model's entropy gradient is small, and the
    # difference of two fp32 gradients carries rounding of the order eps * |policy gradient|.
    mbs, norm, coef = microbatches(batch, 32), batch.loss_norm(16), 50.0
    cfg0 = RLConfig(kl_coef=0.0, loss_agg="token-mean")
    m0, g0, _, rec = _step(trainer, mbs, cfg0, norm, record=True)
    m1, g1, _, _ = _step(trainer, mbs, RLConfig(kl_coef=0.0, loss_agg="token-mean", entropy_coef=coef), norm)
    # loss_1 - loss_0 = -coef * sum_t w_t H_t with w_t = m_t / N (token-mean); logits_t = W h_t.
    want = torch.zeros_like(g0["output_layer.weight"], dtype=torch.float64)
    h_sum = 0.0
    for mb, hidden, logits in zip(mbs, rec.hidden, rec.logits, strict=True):
        logp = torch.log_softmax(logits, dim=-1)
        h = -(logp.exp() * logp).sum(-1)
        w = (mb.loss_mask > 0).double() / norm.num_tokens
        dh = -logp.exp() * (logp + h.unsqueeze(-1))  # dH/dlogits, closed form
        want += torch.einsum("bsv,bsh->vh", -coef * w.unsqueeze(-1) * dh, hidden)
        h_sum += (w * h).sum().item()
    assert m1["loss"] - m0["loss"] == pytest.approx(-coef * h_sum, rel=TOL)
    got = (g1["output_layer.weight"] - g0["output_layer.weight"]).double()
    assert want.abs().max() > 0.01 * g0["output_layer.weight"].abs().max()
    assert (got - want).abs().max() <= TOL * want.abs().max()
    # And the entropy bonus reaches the layers below (through the output layer's input gradient).
    assert any((g1[n] - g0[n]).abs().max() > 0 for n in g0 if n != "output_layer.weight")


def test_loss_with_entropy_coef_is_split_invariant(trainer):
    batch = _batch(groups=3, seed=2)
    cfg = RLConfig(kl_coef=0.0, entropy_coef=0.1)
    results = []
    for rows in (1, 2, 4):
        mbs = microbatches(batch, 24, rows_per_microbatch=rows)
        metrics, grads, _, _ = _step(trainer, mbs, cfg, batch.loss_norm(16))
        flat = torch.cat([g.reshape(-1) for g in grads.values()])
        results.append((len(mbs), finalize_metrics(metrics), flat))
    assert len({n for n, _, _ in results}) == 3  # three different splits into microbatches
    _, m_ref, g_ref = results[0]
    assert m_ref["entropy_loss"] < 0
    for _, m, g in results[1:]:
        for key in ("loss", "pg_loss", "entropy_loss", "entropy", "num_tokens"):
            assert m[key] == pytest.approx(m_ref[key], rel=TOL, abs=1e-7), key
        assert (g - g_ref).abs().max() <= TOL * g_ref.abs().max()

"""Trainer options on micro_moe at world 1 (CPU, fp32).

- The GRPO Reference is forward-only (issue 16, defect 8): no DDP wrapper or grad buffers, no
  optimizer or schedule, no `main_grad`; loaded from a checkpoint of the policy, its logprobs equal
  the training Trainer's, bit for bit, also after its host offload round trip.
- Selective recompute (parallel.recompute=selective + recompute_modules, megatron-core's list): the
  named modules really run twice per microbatch (forward hooks count), and loss, grad norm and the
  updated weights equal the run without recompute exactly. Bad module lists are one-line config
  errors naming the key; moe_act / layernorm are refused on CPU (grouped GEMM / TE only).
- The non-finite guard on a loss term: a NaN objective in one microbatch skips the step (weights and
  Adam state untouched), the warning names the loss; optim.max_bad_steps consecutive skips raise a
  one-line NonFiniteError naming the step; `rl.max_bad_steps` points to `optim.max_bad_steps`.
  A NaN in one named term (pg_loss, kl_loss, ...) is named as that term although the objective that
  sums it is NaN too; a NaN in the objective alone is named 'loss'.
- Weights holding a NaN/Inf are refused by the HF export (before its directory exists) and by a
  checkpoint save, each with a one-line error naming the weight.
- The guard on a gradient: a NaN in one element of one weight's gradient skips the step, and the
  warning names that weight, its optimizer group ("dense group" for every weight at world 1: experts
  form their own group only under expert parallelism) and the rank.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel

from r1_megatron.train import checkpointing as dist_ckpt
from r1_megatron.config.loader import ConfigError, load_config
from r1_megatron.parallel.device import seed_all, single_rank_world
from r1_megatron.parallel.groups import resolve_layout
from r1_megatron.train.nonfinite import OBJECTIVE, NonFiniteError, StepGuard
from r1_megatron.train.forward import ForwardModel as Reference
from r1_megatron.train.sft import local_loss_tokens, sft_loss
from r1_megatron.train.trainer import Trainer
from r1_megatron.train.weights import export_hf
from tests.dist._scenarios import global_batch

CONFIG = "configs/micro_moe_sft.yaml"


def _cfg(*overrides: str):
    return load_config(CONFIG, ["parallel.micro_batch_size=1", *overrides])


@pytest.fixture(scope="module")
def world():
    return single_rank_world(0, device=torch.device("cpu"))


def _trainer(cfg) -> Trainer:
    seed_all(cfg.seed)
    return Trainer(cfg, resolve_layout(cfg, 1), torch.device("cpu"))


def _step(trainer: Trainer, seed: int = 1) -> dict:
    mbs = global_batch(seed)
    return trainer.train_step(mbs, sft_loss(local_loss_tokens(mbs)))


def test_reference_is_forward_only_with_the_trainers_logprobs(world, tmp_path):
    policy = _trainer(_cfg())
    _step(policy)  # weights that differ from any fresh init
    saved = dist_ckpt.save(policy, tmp_path / "ckpt")
    for on_host in ("true", "false"):
        cfg = _cfg(f"checkpoint.load={saved}", f"offload.reference_on_host={on_host}")
        seed_all(cfg.seed + 5)  # another init: the load must win
        ref = Reference(cfg, resolve_layout(cfg, 1), torch.device("cpu"))
        t = ref.trainer
        assert t.optimizer is None and t.scheduler is None
        assert not isinstance(t.model[0], DistributedDataParallel)
        assert not any(hasattr(p, "main_grad") or p.grad is not None for p in t.unwrapped.parameters())
        assert not any(isinstance(m, DistributedDataParallel) for m in t.model[0].modules())
        mbs = global_batch(7)
        got, want = ref.logprobs(mbs), policy.forward_logprobs(mbs)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), on_host


def _forward_calls(trainer: Trainer, names: tuple[str, ...]) -> dict[str, int]:
    calls = dict.fromkeys(names, 0)
    modules = dict(trainer.unwrapped.named_modules())
    for name in names:
        modules[name].register_forward_hook(lambda m, a, o, n=name: calls.__setitem__(n, calls[n] + 1))
    return calls


@pytest.mark.parametrize("modules,recomputed", [
    ("core_attn,mla_up_proj,mlp,shared_experts",
     ("decoder.layers.0.self_attention.core_attention", "decoder.layers.0.self_attention.linear_q_up_proj",
      "decoder.layers.0.mlp", "decoder.layers.1.mlp.shared_experts")),
    ("moe", ("decoder.layers.1.mlp.shared_experts",)),
])
def test_selective_recompute_is_exact(world, modules, recomputed):
    plain = _trainer(_cfg())
    plain_calls = _forward_calls(plain, recomputed)
    want = _step(plain)
    trainer = _trainer(_cfg("parallel.recompute=selective", f"parallel.recompute_modules=[{modules}]"))
    assert trainer.config.recompute_granularity == "selective"
    calls = _forward_calls(trainer, recomputed)
    got = _step(trainer)
    assert all(calls[n] == 2 * plain_calls[n] > 0 for n in recomputed), (calls, plain_calls)
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    for (name, p), q in zip(trainer.unwrapped.named_parameters(), plain.unwrapped.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_recompute_config_errors(world):
    with pytest.raises(ConfigError, match=r"parallel\.recompute_modules: 'attn' is not one of"):
        _trainer(_cfg("parallel.recompute=selective", "parallel.recompute_modules=[attn]"))
    with pytest.raises(ConfigError, match=r"parallel\.recompute_modules: 'moe_act' needs the GPU path"):
        _trainer(_cfg("parallel.recompute=selective", "parallel.recompute_modules=[moe_act]"))
    with pytest.raises(ConfigError, match=r"needs parallel\.recompute=selective, got 'full'"):
        _trainer(_cfg("parallel.recompute=full", "parallel.recompute_modules=[mlp]"))


def _nan_loss_in_second_microbatch(num_tokens: float):
    inner = sft_loss(num_tokens)
    seen = []

    def loss_fn(logprobs, mb):
        seen.append(1)
        loss, sums = inner(logprobs, mb)
        return (loss * float("nan"), sums) if len(seen) == 2 else (loss, sums)

    return loss_fn


def _adam_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """Every Adam state tensor (moments and step counts), in a fixed order."""
    return [v for o in trainer.optimizer.chained_optimizers for st in o.optimizer.state.values()
            for _, v in sorted(st.items()) if torch.is_tensor(v)]


def test_nan_loss_is_skipped_and_named(world, caplog):
    trainer = _trainer(_cfg("optim.max_bad_steps=2"))
    _step(trainer)
    weights = [p.detach().clone() for p in trainer.unwrapped.parameters()]
    adam = [v.clone() for v in _adam_tensors(trainer)]
    mbs = global_batch(2)
    with caplog.at_level(logging.WARNING, logger="r1_megatron.train.nonfinite"):
        metrics = trainer.train_step(mbs, _nan_loss_in_second_microbatch(local_loss_tokens(mbs)))
    assert metrics["update_ok"] == 0.0 and metrics["train/skipped_steps"] == 1.0 and trainer.step == 1
    assert "train: step 2 skipped (1 in a row): non-finite loss term 'loss'" in caplog.text
    assert all(torch.equal(a, p) for a, p in zip(weights, trainer.unwrapped.parameters(), strict=True))
    after = _adam_tensors(trainer)
    assert len(adam) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(adam, after, strict=True))
    with pytest.raises(NonFiniteError, match=r"^train: 2 consecutive steps skipped \(optim\.max_bad_steps=2\), "
                                             r"the last at step 2: non-finite loss term 'loss'"):
        trainer.train_step(mbs, _nan_loss_in_second_microbatch(local_loss_tokens(mbs)))


@pytest.mark.parametrize(("bad", "named"), [
    ({"kl_loss"}, "kl_loss"),
    ({"pg_loss", "entropy_loss"}, "pg_loss"),  # the fixed order: pg_loss, kl_loss, entropy_loss, ...
    ({"entropy_loss", "kl_sum"}, "entropy_loss"),  # a named term before the other metrics
    ({"moe_aux_loss"}, "moe_aux_loss"),
    (set(), "loss"),  # the objective alone
])
def test_the_first_bad_loss_term_is_named_before_the_objective(world, bad, named):
    guard = StepGuard(torch.nn.Linear(2, 2), max_bad_steps=3)
    terms = ("pg_loss", "kl_loss", "entropy_loss", "kl_sum", "moe_aux_loss", "num_tokens")
    metrics = {k: float("nan") if k in bad else 1.0 for k in terms}
    metrics |= {OBJECTIVE: float("nan"), "loss": float("nan")}  # what a NaN term does to the sum
    assert guard.check(1, metrics, grad_norm=1.0, found_inf=False) == f"non-finite loss term '{named}'"
    assert guard.check(2, {k: 1.0 for k in metrics}, grad_norm=1.0, found_inf=False) is None


def _nan_in_first_element(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g.view(-1)[0] = float("nan")
    return g


# The group is megatron's optimizer group (train/nonfinite.py `_param_grads`): an expert weight is in the
# expert group only under expert parallelism (allreduce=False); at ep 1 it is reduced with the dense ones.
@pytest.mark.parametrize("weight", ["decoder.layers.0.self_attention.linear_proj.weight",
                                    "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"])
def test_nan_gradient_names_the_weight_and_its_group(world, caplog, weight):
    trainer = _trainer(_cfg())
    param = dict(trainer.unwrapped.named_parameters())[weight]
    weights = [p.detach().clone() for p in trainer.unwrapped.parameters()]
    hook = param.register_hook(_nan_in_first_element)
    with caplog.at_level(logging.WARNING, logger="r1_megatron.train.nonfinite"):
        metrics = _step(trainer)
    hook.remove()
    assert metrics["update_ok"] == 0.0 and metrics["train/skipped_steps"] == 1.0
    assert f"non-finite gradient (grad norm nan), first in {weight} (dense group) on rank 0" in caplog.text
    assert "loss term" not in caplog.text  # the loss itself stayed finite
    assert all(torch.equal(a, p) for a, p in zip(weights, trainer.unwrapped.parameters(), strict=True))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_export_and_save_refuse_nonfinite_weights(world, tmp_path, value):
    trainer = _trainer(_cfg())
    weight = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    with torch.no_grad():
        dict(trainer.unwrapped.named_parameters())[weight].view(-1)[7] = value
    first = f"non-finite weights (first: {weight} on rank 0)"
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    refusal = f"{hf}: refusing to export {first}"
    with pytest.raises(dist_ckpt.CheckpointError, match=f"^{re.escape(refusal)}$"):
        export_hf(trainer, hf)
    assert not hf.exists()
    refusal = f"{ckpt / 'step_000000'}: refusing to save {first}; {ckpt / 'latest'} still names no checkpoint"
    with pytest.raises(dist_ckpt.CheckpointError, match=f"^{re.escape(refusal)}$"):
        dist_ckpt.save(trainer, ckpt)
    assert not ckpt.exists()


def test_max_bad_steps_config(world):
    with pytest.raises(ConfigError, match=r"unknown key 'rl\.max_bad_steps': it is 'optim\.max_bad_steps'"):
        _cfg("rl.max_bad_steps=5")
    with pytest.raises(ValueError, match=r"optim\.max_bad_steps must be >= 1, got 0"):
        _trainer(_cfg("optim.max_bad_steps=0"))


def test_cli_prints_the_stop_as_one_line(monkeypatch, capsys):
    import r1_megatron.cli.train as loop
    from r1_megatron.cli import main

    def stop(argv):
        raise NonFiniteError("train: 3 consecutive steps skipped (optim.max_bad_steps=3), the last at step 7: x")

    monkeypatch.setattr(loop, "main", stop)
    assert main(["train", "cfg.yaml"]) == 1
    assert capsys.readouterr().err == ("r1m train: train: 3 consecutive steps skipped (optim.max_bad_steps=3), "
                                       "the last at step 7: x\n")

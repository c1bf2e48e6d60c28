"""Training precision (issue 16, defect 4): model.dtype selects fp32 or bf16 with fp32 main weights.

- Selection: `auto` is bf16 on CUDA and fp32 on CPU; on GPU bf16 takes the precision-aware
  distributed optimizer (fp32 main params, grads and moments), on CPU megatron's
  Float16OptimizerWithFloat16Params; fp32 keeps the plain fp32 optimizer. Megatron's own
  OptimizerConfig accepts every CPU choice.
- The planner counts what is built: 2/4/10 bytes per weight (bf16, fp32 grads, precision-aware
  optimizer: 16-bit remainder + fp32 moments), 2/4/12 with a full fp32 main copy, 4/4/8 in fp32; the
  public 671B layouts still fit in 80 GB with the conservative full fp32 copy.
- bf16 on CPU: the model is bf16 under Float16Module, every weight has an fp32 main copy in the
  optimizer, one train step moves every main weight and leaves the bf16 weight equal to its rounded
  main copy; loss and logprobs are fp32 and close to the fp32 model's (same init).
- megatron's Float16OptimizerWithFloat16Params still rejects CPU tensors (the compat_cpu fix is needed).
- The refit stream (rl/session.py weight_stream) of a bf16 trainer is sent in bf16: every tensor in the
  dtype the model holds it in (the router's fp32 bias buffers aside, every weight bf16), bit-equal to
  the model's own weights, in many buckets; on CPU and (gpu-marked) on CUDA over NCCL, world 1.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.transformer.module import Float16Module

from r1_megatron.config.loader import load_config
from r1_megatron.model import precision
from r1_megatron.parallel import compat_cpu
from r1_megatron.parallel.device import seed_all, single_rank_world
from r1_megatron.parallel.groups import resolve_layout
from r1_megatron.plan import GiB, Layout
from r1_megatron.plan.memory import stage_weights
from r1_megatron.plan.report import plan_job
from r1_megatron.train.sft import local_loss_tokens, sft_loss
from r1_megatron.train.trainer import Trainer
from tests.dist._scenarios import global_batch

CONFIG = "configs/micro_moe_sft.yaml"


def _cfg(*overrides: str):
    return load_config(CONFIG, ["parallel.micro_batch_size=1", *overrides])


def test_dtype_selection():
    assert precision.training_dtype("auto", "cpu") == torch.float32
    assert precision.training_dtype("auto", "cuda") == torch.bfloat16
    assert precision.training_dtype("bfloat16", "cpu") == torch.bfloat16
    assert precision.training_dtype("float32", "cuda") == torch.float32
    gpu = precision.select(_cfg("optim.distributed_optimizer=true"), "cuda")
    assert (gpu.dtype, gpu.distributed, gpu.precision_aware, gpu.main_param_bytes) == (torch.bfloat16, True, True, 2)
    kwargs = precision.optimizer_kwargs(gpu)
    assert kwargs["bf16"] and kwargs["use_precision_aware_optimizer"] and kwargs["use_distributed_optimizer"]
    assert kwargs["main_params_dtype"] == kwargs["main_grads_dtype"] == kwargs["exp_avg_dtype"] == torch.float32
    assert precision.ddp_kwargs(gpu) == {"grad_reduce_in_fp32": True, "use_distributed_optimizer": True}
    plain = precision.select(_cfg("optim.distributed_optimizer=true", "optim.precision_aware=false"), "cuda")
    assert (plain.distributed, plain.precision_aware, plain.main_param_bytes) == (True, False, 4)
    for device in ("cpu", "cuda"):  # without the distributed optimizer: Float16Optimizer, full fp32 copy
        p = precision.select(_cfg("model.dtype=bfloat16"), device)
        assert (p.dtype, p.distributed, p.precision_aware, p.main_param_bytes) == (torch.bfloat16, False, False, 4)
    cpu = precision.select(_cfg("optim.distributed_optimizer=true"), "cpu")  # the CPU never shards
    assert (cpu.dtype, cpu.distributed, cpu.main_param_bytes) == (torch.float32, False, 0)
    fp32 = precision.select(_cfg("model.dtype=float32", "optim.distributed_optimizer=true"), "cuda")
    assert (fp32.precision_aware, fp32.main_param_bytes, fp32.mixed) == (False, 0, False)
    for p in (precision.select(_cfg("model.dtype=bfloat16"), "cpu"), cpu):
        config = OptimizerConfig(optimizer="adam", lr=1e-3, **precision.optimizer_kwargs(p))
        assert config.params_dtype == p.dtype and config.bf16 == p.mixed


def _bytes_per_weight(*overrides: str) -> tuple[float, float, float]:
    """(params per weight, grads per trainable weight, optimizer per trainable weight) of micro_moe
    at dp 1 (nothing sharded); the expert bias is a weight the optimizer does not hold."""
    s = plan_job(_cfg("parallel.dp=1", *overrides)).stages[0]
    trainable = sum(w.total for w in stage_weights(_cfg().model, Layout())[0] if w.trainable)
    return s.bytes["params"] / s.params_per_rank, s.bytes["grads"] / trainable, s.bytes["optimizer"] / trainable


def test_planner_counts_what_is_built():
    assert _bytes_per_weight("optim.distributed_optimizer=true") == (2, 4, 10)
    assert _bytes_per_weight("optim.distributed_optimizer=true", "optim.precision_aware=false") == (2, 4, 12)
    assert _bytes_per_weight("optim.distributed_optimizer=false") == (2, 4, 12)
    assert _bytes_per_weight("model.dtype=float32") == (4, 4, 8)
    for config in ("dsv3_671b_grpo_256xh100", "dsv3_671b_grpo_512xh100"):
        aware = plan_job(load_config(f"configs/{config}.yaml", []))
        full_copy = plan_job(load_config(f"configs/{config}.yaml", ["optim.precision_aware=false"]))
        assert aware.fits and full_copy.fits, (aware.problems, full_copy.problems)
        worst = max(max(s.phases.values()) for s in full_copy.stages) / GiB
        assert worst < 80
        a, f = aware.worst.bytes["optimizer"], full_copy.worst.bytes["optimizer"]
        assert abs(a / f - 10 / 12) < 1e-6


@pytest.fixture(scope="module")
def world():
    return single_rank_world(0, device=torch.device("cpu"))


def _trainer(cfg) -> Trainer:
    seed_all(cfg.seed)
    return Trainer(cfg, resolve_layout(cfg, 1), torch.device("cpu"))


def test_upstream_float16_optimizer_rejects_cpu_tensors(world):
    original = compat_cpu.REPLACED["Float16OptimizerWithFloat16Params.__init__"]
    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    inner = torch.optim.Adam([param])
    config = OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="torch.cuda.BFloat16Tensor"):
        original(Float16OptimizerWithFloat16Params.__new__(Float16OptimizerWithFloat16Params), inner, config,
                 None, None)


def test_bf16_train_step_on_cpu(world):
    mbs = global_batch(1)
    fp32 = _trainer(_cfg("model.dtype=float32"))
    ref = fp32.train_step(mbs, sft_loss(local_loss_tokens(mbs)))
    ref_lp = fp32.forward_logprobs(mbs)
    trainer = _trainer(_cfg("model.dtype=bfloat16"))
    assert isinstance(trainer.model[0].module, Float16Module)
    assert {p.dtype for p in trainer.unwrapped.parameters()} == {torch.bfloat16}
    (opt,) = trainer.optimizer.chained_optimizers
    assert isinstance(opt, Float16OptimizerWithFloat16Params)
    pairs = [(m, f) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True)
             for m, f in zip(mg, fg, strict=True)]
    assert {id(m) for m, _ in pairs} == {id(p) for p in trainer.unwrapped.parameters()}
    assert all(f.dtype == torch.float32 for _, f in pairs) and not any(opt.fp32_from_fp32_groups)
    before = [f.detach().clone() for _, f in pairs]
    metrics = trainer.train_step(mbs, sft_loss(local_loss_tokens(mbs)))
    assert metrics["update_ok"] == 1.0 and abs(metrics["loss"] - ref["loss"]) < 2e-2
    assert all(not torch.equal(b, f) for b, (_, f) in zip(before, pairs, strict=True))  # every main weight moved
    assert all(torch.equal(m, f.to(torch.bfloat16)) for m, f in pairs)  # bf16 weight = its rounded main copy
    (lp,) = trainer.forward_logprobs(mbs[:1])
    assert lp.dtype == torch.float32 and (lp - ref_lp[0]).abs().max() < 0.1


def test_bf16_reference_is_bf16(world):
    from r1_megatron.train.forward import ForwardModel as Reference

    cfg = _cfg("model.dtype=bfloat16", "offload.reference_on_host=false")
    ref = Reference(cfg, resolve_layout(cfg, 1), torch.device("cpu"))
    assert {p.dtype for p in ref.trainer.unwrapped.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_refit_stream_is_sent_in_the_training_dtype(device):
    from r1_megatron.checkpoint import hf
    from r1_megatron.rl.session import weight_stream

    if device == "cpu":
        cfg = _cfg("model.dtype=bfloat16")
    else:
        cfg = _cfg("parallel.device=cuda", "parallel.backend=nccl", "model.dtype=bfloat16")
    where = single_rank_world(0, device=torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
    seed_all(cfg.seed)
    trainer = Trainer(cfg, resolve_layout(cfg, 1), where)
    want = list(hf.export_weights(trainer.unwrapped, cfg.model))
    got = list(weight_stream(trainer, bucket_mb=0.05))  # views, keeping every bucket alive
    buckets = {t.untyped_storage().data_ptr(): t.dtype for _, t in got}  # bucket storage -> its dtype
    weights = dict(want)  # the stream puts the MTP layer's copies next to their sources, export last
    assert len(got) == len(weights) and {n for n, _ in got} == set(weights)
    for name, a in got:
        b = weights[name]
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), name
    dtypes = {a.dtype for n, a in got if not n.endswith("e_score_correction_bias")}
    assert dtypes == {torch.bfloat16} and len(buckets) > 10
    assert sum(dtype == torch.bfloat16 for dtype in buckets.values()) > 10


@pytest.mark.gpu
def test_bf16_precision_aware_distributed_optimizer_on_gpu():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    device = single_rank_world(0, device=torch.device("cuda", 0))
    cfg = _cfg("parallel.device=cuda", "parallel.backend=nccl", "optim.distributed_optimizer=true")
    seed_all(cfg.seed)
    trainer = Trainer(cfg, resolve_layout(cfg, 1), device)
    assert trainer.precision.precision_aware
    assert all(isinstance(o, DistributedOptimizer) for o in trainer.optimizer.chained_optimizers)
    assert {p.dtype for p in trainer.unwrapped.parameters()} == {torch.bfloat16}
    mbs = global_batch(1)
    m = trainer.train_step(mbs, sft_loss(local_loss_tokens(mbs)))
    assert m["update_ok"] == 1.0 and torch.isfinite(torch.tensor(m["loss"]))


def test_bf16_checkpoints(world, tmp_path):
    """An fp32 checkpoint loads into a bf16 model (weights rounded); a bf16 run resumes bit-exactly
    (bf16 weights, fp32 main weights and Adam state through megatron's sharded optimizer state)."""
    from r1_megatron.train import checkpointing as dist_ckpt

    def step(trainer: Trainer, seed: int) -> float:
        mbs = global_batch(seed)
        return trainer.train_step(mbs, sft_loss(local_loss_tokens(mbs)))["loss"]

    fp32 = _trainer(_cfg("model.dtype=float32"))
    step(fp32, 1)
    saved = dist_ckpt.save(fp32, tmp_path / "fp32")
    bf16 = _trainer(_cfg("model.dtype=bfloat16"))
    dist_ckpt.load_model_weights(bf16.unwrapped, saved)
    pairs = zip(fp32.unwrapped.parameters(), bf16.unwrapped.parameters(), strict=True)
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in pairs)
    step(bf16, 1)
    dist_ckpt.save(bf16, tmp_path / "bf16")
    losses = [step(bf16, s) for s in (2, 3)]
    resumed = _trainer(_cfg("model.dtype=bfloat16", "seed=99"))
    extra = dist_ckpt.resume(resumed, tmp_path / "bf16")
    assert extra["_optimizer_restored"] and [step(resumed, s) for s in (2, 3)] == losses

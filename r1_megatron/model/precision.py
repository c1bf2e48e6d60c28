"""Training precision: which dtype the weights have, and how DDP and the optimizer treat it.

bfloat16 follows Megatron-LM's mixed-precision recipe:
- the model is built in bf16 and wrapped in megatron's `Float16Module` (bf16 inputs on the first
  pipeline stage, fp32 outputs on the last; our per-token NLL is computed in fp32 by megatron's
  vocab-parallel cross entropy either way);
- DDP accumulates and reduces gradients in fp32 (`grad_reduce_in_fp32`);
- the optimizer keeps fp32 main weights and fp32 Adam moments. On CPU (and on GPU without the
  distributed optimizer) that is megatron's `Float16OptimizerWithFloat16Params` (a full fp32 copy of
  every bf16 weight); on GPU with `optim.distributed_optimizer` it is the distributed optimizer,
  precision-aware when `optim.precision_aware` (TE's FusedAdam keeps the fp32 main weight as the bf16
  weight plus a 16-bit remainder: the same fp32 bits in 2 extra bytes instead of 4).
float32 trains fp32 weights with megatron's plain fp32 optimizer (no main copy).

`model.dtype: auto` means bfloat16 on CUDA and float32 elsewhere (the CPU path stays fp32 by default:
CPU tests compare against fp32 references). plan/memory.py counts the bytes these choices build.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1_megatron.config.schema import JobConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def training_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """model.dtype resolved for `device` (auto: bfloat16 on CUDA, float32 elsewhere)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of ['auto', {', '.join(map(repr, DTYPES))}]")
    return DTYPES[dtype]


@dataclass(frozen=True)
class TrainingPrecision:
    """What the trainer builds for one job on one device.

    dtype: the weights' dtype; distributed: megatron's distributed optimizer (GPU only); precision_aware:
    its precision-aware variant (bf16 + distributed only); main_param_bytes: bytes per weight of the
    optimizer's fp32 main copy beyond the weight itself (0 in fp32, 2 as a 16-bit remainder, 4 as a
    full fp32 copy)."""

    dtype: torch.dtype
    distributed: bool
    precision_aware: bool

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    @property
    def main_param_bytes(self) -> int:
        if not self.mixed:
            return 0
        return 2 if self.precision_aware else 4


def select(cfg: JobConfig, device: torch.device | str) -> TrainingPrecision:
    """The precision choices of `cfg` on `device` (see the module docstring)."""
    gpu = torch.device(device).type == "cuda"
    dtype = training_dtype(cfg.model.dtype, device)
    distributed = gpu and cfg.optim.distributed_optimizer
    aware = distributed and dtype == torch.bfloat16 and cfg.optim.precision_aware
    return TrainingPrecision(dtype=dtype, distributed=distributed, precision_aware=aware)


def ddp_kwargs(p: TrainingPrecision) -> dict:
    """DistributedDataParallelConfig fields: fp32 grad buffers and reduction in every dtype."""
    return dict(grad_reduce_in_fp32=True, use_distributed_optimizer=p.distributed)


def optimizer_kwargs(p: TrainingPrecision) -> dict:
    """OptimizerConfig fields for the precision: bf16 mixed precision with fp32 main params, grads
    and moments (megatron's defaults for main_params/main_grads/exp_avg dtypes are fp32)."""
    out = dict(
        params_dtype=p.dtype,
        bf16=p.dtype == torch.bfloat16,
        use_distributed_optimizer=p.distributed,
        use_precision_aware_optimizer=p.precision_aware,
    )
    if p.precision_aware:
        out.update(main_params_dtype=torch.float32, main_grads_dtype=torch.float32,
                   exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32)
    return out


def wrap(module: torch.nn.Module, p: TrainingPrecision) -> torch.nn.Module:
    """`module` as the trainer runs it: under megatron's Float16Module when mixed (casts the module to
    bf16, the first stage's float inputs to bf16 and the last stage's outputs to fp32)."""
    if not p.mixed:
        return module
    from megatron.core.transformer.module import Float16Module

    return Float16Module(module.config, module)

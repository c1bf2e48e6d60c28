"""Process groups from the config: `parallel.tp/pp/ep/etp/dp/sequence_parallel` -> megatron parallel_state.

`init_process_groups(cfg)` is called once per process, before any model is built. It reads the
torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless told otherwise, checks the
layout against the world size *before* any collective (so a bad layout makes every rank fail alike,
with the same one-line message, instead of hanging), then starts torch.distributed (gloo on CPU,
NCCL on GPU) and megatron's groups.

Megatron's grid, for reference (order tp-cp-ep-dp-pp):
  dense params:  world = tp * dp * pp
  expert params: world = etp * ep * edp * pp, so ep * etp must divide tp * dp
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile

import torch
import torch.distributed as dist

from r1_megatron.config.loader import ConfigError
from r1_megatron.config.schema import JobConfig, ParallelConfig
from r1_megatron.config.validate import validate_model, validate_parallel

# megatron-core is imported inside the functions that start groups: checking a layout
# (resolve_layout) stays cheap, so a bad layout fails in a second on every rank.


def resolve_layout(cfg: JobConfig, world_size: int) -> ParallelConfig:
    """The layout this job runs with: dp filled in, sequence_parallel only where it means something
    (tp > 1), etp = tp when ep is 1 (see below).

    Raises ConfigError (one line, key and numbers) when the layout cannot run on `world_size` ranks.
    """
    validate_model(cfg)
    validate_parallel(cfg, world_size)
    p = cfg.parallel
    dp = p.dp or world_size // (p.tp * p.pp)
    etp = p.etp
    if cfg.model.num_experts and p.ep == 1 and etp != p.tp:
        # megatron marks expert weights as expert-parallel (grads summed over the expert-DP group)
        # only when ep > 1; with ep == 1 they are reduced like dense weights, over DP alone, so
        # experts that see only this TP rank's tokens (etp < tp) would miss the other ranks' share.
        # etp therefore follows tp at ep 1 (megatron's own default); the schema default 1 means that.
        if etp != 1:
            raise ConfigError(
                f"parallel.etp({p.etp}) must equal parallel.tp({p.tp}) when parallel.ep is 1 "
                "(megatron sums expert gradients across ranks only with ep > 1)"
            )
        etp = p.tp
    if p.micro_batch_size < 1:
        raise ConfigError(f"parallel.micro_batch_size must be >= 1, got {p.micro_batch_size}")
    # megatron refuses sequence parallelism without TP; at tp 1 it is a no-op, so configs may leave it on.
    return dataclasses.replace(p, dp=dp, etp=etp, sequence_parallel=p.sequence_parallel and p.tp > 1)


def backend_for(p: ParallelConfig, device: torch.device) -> str:
    """parallel.backend, with 'auto' meaning NCCL on CUDA and gloo elsewhere."""
    if p.backend != "auto":
        if p.backend == "nccl" and device.type != "cuda":
            raise ConfigError(f"parallel.backend: 'nccl' needs a CUDA device, but the device is {device}")
        return p.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_groups(
    cfg: JobConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout_minutes: float = 30.0,
) -> tuple[ParallelConfig, torch.device]:
    """Start torch.distributed and megatron's parallel_state for `cfg.parallel`; seed everything.

    rank/world_size default to the torchrun environment (1 process when unset); init_method to
    env:// (MASTER_ADDR/MASTER_PORT). Returns the resolved layout and the device to build on.
    """
    from r1_megatron.parallel import compat_cpu
    from r1_megatron.parallel.device import seed_all, select_device

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    layout = resolve_layout(cfg, world_size)
    device = select_device(cfg.parallel.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        compat_cpu.activate()
    backend = backend_for(cfg.parallel, device)
    if not dist.is_initialized():
        if init_method is None and world_size == 1 and "MASTER_ADDR" not in os.environ:
            # One process outside torchrun: a file store in a fresh directory. A TCP store would need a
            # free port (a race with other jobs), and writing MASTER_PORT into os.environ leaked the
            # still-bound port into every subprocess started later (EADDRINUSE in CI).
            init_method = "file://" + os.path.join(tempfile.mkdtemp(prefix="r1m-store-"), "store")
        dist.init_process_group(
            backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    elif dist.get_world_size() != world_size:
        running = dist.get_world_size()
        raise ConfigError(f"torch.distributed already runs {running} ranks, not world_size({world_size})")
    set_layout(layout, timeout_minutes=timeout_minutes)
    seed_all(cfg.seed)
    return layout, device


def set_layout(layout: ParallelConfig, *, timeout_minutes: float = 30.0) -> None:
    """(Re)build megatron's groups for `layout` on the running world (tests switch layouts this way)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=int(max(1, timeout_minutes)),
    )


def destroy_process_groups() -> None:
    """Tear down megatron's groups and torch.distributed (end of a job)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


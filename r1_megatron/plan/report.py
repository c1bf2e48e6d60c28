"""A job config -> Plan, and the plan as text or JSON (`r1m plan`, `r1m validate`)."""

from __future__ import annotations

import math
from dataclasses import asdict

from r1_megatron.config.loader import ConfigError
from r1_megatron.config.schema import JobConfig
from r1_megatron.config.validate import validate
from r1_megatron.plan.memory import GiB, Layout, Plan, Precision, Workload, plan

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def job_world_size(cfg: JobConfig, world_size: int | None = None) -> int:
    """The world size to plan for: given, or tp*pp*dp when parallel.dp is set."""
    p = cfg.parallel
    if world_size:
        return world_size
    if p.dp > 0:
        return p.tp * p.pp * p.dp
    raise ConfigError(
        "parallel.dp is 0 (derived from the world size): set parallel.dp or pass --world-size N"
    )


def plan_job(cfg: JobConfig, world_size: int | None = None) -> Plan:
    """Validate `cfg` against the world size and plan it."""
    world = job_world_size(cfg, world_size)
    validate(cfg, world)
    p = cfg.parallel
    dp = p.dp or world // (p.tp * p.pp)
    layout = Layout(
        tp=p.tp,
        pp=p.pp,
        ep=p.ep,
        etp=p.etp,
        dp=dp,
        redundant_experts=p.redundant_experts,
        first_stage_layers=p.first_stage_layers,
        last_stage_layers=p.last_stage_layers,
        sequence_parallel=p.sequence_parallel,
        recompute=p.recompute,
        distributed_optimizer=cfg.optim.distributed_optimizer,
        gpus_per_node=p.gpus_per_node,
        gpu_memory_gb=p.gpu_memory_gb,
    )
    samples = cfg.rl.prompts_per_step * cfg.rl.group_size / cfg.rl.num_minibatches
    work = Workload(
        seq_length=cfg.data.seq_length,
        micro_batch_size=p.micro_batch_size,
        microbatches=max(1, math.ceil(samples / (dp * p.micro_batch_size))),
        rollout_tp=cfg.rollout.tp,
        rollout_dtype_bytes=DTYPE_BYTES[cfg.rollout.dtype],
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        offload=cfg.offload.enabled,
        reference=cfg.rl.kl_coef > 0,
        reference_on_host=cfg.offload.reference_on_host,
    )
    return plan(cfg.model, layout, work, job_precision(cfg), card=cfg.model.card)


def job_precision(cfg: JobConfig) -> Precision:
    """Bytes per element of what the trainer builds for `cfg` on a GPU (the path the planner plans)."""
    from r1_megatron.model.precision import select

    chosen = select(cfg, "cuda")
    return Precision.for_training(chosen.dtype.itemsize, chosen.main_param_bytes)


def to_json(pl: Plan) -> dict:
    """The plan as plain data; bytes are integers."""
    worst = pl.worst
    return {
        "card": pl.card,
        "total_params": pl.counts.total,
        "total_params_with_mtp": pl.counts.total_with_mtp,
        "mtp_params": pl.counts.mtp_with_copies,
        "mtp_params_without_shared_copies": pl.counts.mtp_own,
        "active_params_per_token": pl.counts.active_per_token,
        "layout": {**asdict(pl.layout), "world": pl.layout.world, "edp": pl.layout.edp},
        "workload": asdict(pl.workload),
        "per_rank": {
            **worst.bytes,
            **{f"peak_{k}": v for k, v in worst.phases.items()},
            "stage": worst.stage,
        },
        "per_stage": [asdict(s) for s in pl.stages],
        "budget_bytes": pl.budget_bytes,
        "rollout": {k: int(v) for k, v in pl.rollout.items()},
        "refit": {
            "send_bytes_per_rank_max": max(s.refit_send_bytes for s in pl.stages),
            "stream_bytes": pl.refit_stream_bytes,
        },
        "host": {
            "offload_bytes_per_rank_max": max(s.host_offload_bytes for s in pl.stages),
            "bytes_per_node": pl.host_per_node_bytes(),
        },
        "fits": pl.fits,
        "problems": pl.problems,
    }


def _n(x: float) -> str:
    """An element count in B / M / k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _g(x: float) -> str:
    return f"{x / GiB:8.1f}"


def format_text(pl: Plan) -> str:
    lay, c = pl.layout, pl.counts
    mtp = (
        f" + MTP {_n(c.mtp_with_copies)} as stored in HF (with its embedding/head copies; "
        f"{_n(c.mtp_own)} without) = {_n(c.total_with_mtp)}"
        if c.mtp_own
        else " (no MTP)"
    )
    lines = [
        f"model {pl.card or '(inline)'}: {_n(c.total)} params{mtp}; {_n(c.active_per_token)} active/token",
        (
            f"layout: world {lay.world} = tp {lay.tp} x cp {lay.cp} x pp {lay.pp} x dp {lay.dp}; "
            f"experts: ep {lay.ep} x etp {lay.etp} x edp {lay.edp} x pp {lay.pp}; "
            f"{-(-lay.world // lay.gpus_per_node)} nodes x {lay.gpus_per_node} GPUs "
            f"of {lay.gpu_memory_gb:g} GiB; "
            f"recompute {lay.recompute}"
        ),
        f"budget per GPU: {pl.budget_bytes / GiB:.1f} GiB (after reserve); GiB per rank by stage:",
        (
            f"{'stage':>5} {'layers':>6} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'logits':>8}"
            f" {'train':>8} {'ref fwd':>8} {'rollout':>8} {'host':>8} {'refit tx':>8}"
        ),
    ]
    for s in pl.stages:
        b, ph = s.bytes, s.phases
        lines.append(
            f"{s.stage:>5} {s.layers:>6} {_g(b['params'])} {_g(b['grads'])} {_g(b['optimizer'])} "
            f"{_g(b['activations'])} {_g(b['logits'])} {_g(ph['train'])} {_g(ph.get('reference', 0))} "
            f"{_g(ph['rollout'])} {_g(s.host_offload_bytes)} {_g(s.refit_send_bytes)}"
        )
    r = pl.rollout
    lines += [
        (
            f"rollout (vLLM tp {pl.workload.rollout_tp}, {int(r['instances'])} instances): share "
            f"{r['vllm_share_bytes'] / GiB:.1f} GiB - weights {r['weights_per_gpu_bytes'] / GiB:.1f} GiB "
            f"- overhead {r['overhead_bytes'] / GiB:.1f} GiB = KV {r['kv_cache_bytes'] / GiB:.1f} GiB = "
            f"{r['kv_tokens']:.0f} tokens ({r['kv_bytes_per_token']:.0f} B/token), "
            f"{int(r['full_length_sequences'])} sequences of {pl.workload.seq_length}"
        ),
        (
            f"refit: stream {pl.refit_stream_bytes / GiB:.1f} GiB; host memory when offloaded: "
            f"{pl.host_per_node_bytes() / GiB:.1f} GiB per node"
        ),
    ]
    if pl.fits:
        lines.append("fits: yes")
    else:
        lines += ["fits: NO"] + [f"  - {p}" for p in pl.problems]
    return "\n".join(lines)

"""`r1m validate CONFIG [key=value ...]`: load a job config strictly and check its layout.

Under torchrun (WORLD_SIZE/RANK set) every rank loads the config, the ranks agree through one gloo
all-reduce of their error flags (under a timeout, so a missing rank cannot hang the others), and all of
them exit non-zero when any one failed. Rank 0 prints the resolved layout and the plan summary. On a GPU
job (parallel.device cuda, or auto with CUDA present) a layout the planner finds too big is an error.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from r1_megatron.config.loader import ConfigError, load_config
from r1_megatron.config.schema import JobConfig
from r1_megatron.config.validate import stage_layers, validate

TIMEOUT_S = float(os.environ.get("R1M_VALIDATE_TIMEOUT", "120"))


def _gpu_job(cfg: JobConfig) -> bool:
    if cfg.parallel.device == "auto":
        import torch

        return torch.cuda.is_available()
    return cfg.parallel.device == "cuda"


def _check(args: argparse.Namespace, world: int | None) -> tuple[str | None, str]:
    """(error, summary) for this rank; never raises on a config problem."""
    from r1_megatron.plan.report import format_text, job_world_size, plan_job

    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world)
        p = cfg.parallel
        if world is None and p.dp:
            world = job_world_size(cfg)
        summary = [
            (
                f"config {args.config}: model {cfg.model.card or cfg.model.arch}; "
                f"tp {p.tp} pp {p.pp} ep {p.ep} etp {p.etp}; layers per stage "
                f"{stage_layers(cfg.model.num_layers, p.pp, p.first_stage_layers, p.last_stage_layers)}; "
                f"device {p.device}, backend {p.backend}"
            )
        ]
        if world is None:
            return None, "\n".join(
                summary + ["world size unknown (parallel.dp 0, not under torchrun): no plan"]
            )
        summary[0] += f"; world {world} = tp {p.tp} x pp {p.pp} x dp {p.dp or world // (p.tp * p.pp)}"
        pl = plan_job(cfg, world)
    except ConfigError as e:
        return str(e), ""
    summary.append(format_text(pl))
    if _gpu_job(cfg) and not pl.fits:
        return "plan: layout does not fit: " + "; ".join(pl.problems), "\n".join(summary)
    return None, "\n".join(summary)


def _agree(failed: bool) -> int:
    """Number of ranks that failed, summed over all ranks (gloo, with a timeout)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        flag = torch.tensor([1 if failed else 0], dtype=torch.int64)
        dist.all_reduce(flag)
        return int(flag.item())
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="r1m validate", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="job config (path or configs/<name>)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ap.add_argument(
        "--world-size", type=int, default=None, help="check against this world size without torchrun"
    )
    args = ap.parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    in_torchrun = "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if in_torchrun else args.world_size
    error, summary = _check(args, world)
    try:
        failures = _agree(error is not None) if in_torchrun and world > 1 else int(error is not None)
    except (RuntimeError, OSError) as e:  # torch.distributed's timeout and store errors are RuntimeErrors
        print(
            f"r1m validate [rank {rank}]: ranks did not agree within {TIMEOUT_S:g}s: {e}".splitlines()[0],
            file=sys.stderr,
        )
        return 1
    if error:
        print(f"r1m validate [rank {rank}]: {error}", file=sys.stderr)
    elif failures:
        print(f"r1m validate [rank {rank}]: {failures} other rank(s) failed", file=sys.stderr)
    if rank == 0 and summary and not failures:
        print(summary)
    return 1 if failures else 0

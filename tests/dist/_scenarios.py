"""Worker side of the multi-rank tests: `python tests/dist/_scenarios.py MODE OUT_DIR [ARGS...]`.

Each mode runs under tests/dist/_launch.py (torchrun-like env) and writes its results to OUT_DIR as
torch files; the test modules compare them. Modes:
  reference OUT           world 1: initial checkpoint, one SFT step, export, post-step logprobs
  layouts OUT INIT L...   for each layout L ("tp,pp,ep,etp,dp,dispatcher[,save]"): load INIT, the same
                          step, export
  crash OUT               (tp2, ep2) 1 step, save; 1 step, a save killed (SIGKILL) between write and commit
  recover OUT             after crash: resume from `latest`; steps to 4, save, 2 steps, and a fresh
                          trainer resumed from the save redoes them; the save read at (tp1, ep1), (pp2)
"""

from __future__ import annotations

import dataclasses
import faulthandler
import gc
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from r1_megatron.config.loader import load_config  # noqa: E402
from r1_megatron.config.schema import JobConfig  # noqa: E402
from r1_megatron.data.packing import pack  # noqa: E402
from r1_megatron.train.microbatch import packed_microbatches, shard_for_data_parallel  # noqa: E402
from r1_megatron.train.sft import local_loss_tokens, sft_loss  # noqa: E402

CONFIG = "configs/micro_moe_sft.yaml"
# Layouts checked against world 1: (tp, pp, ep, etp, dp, dispatcher[, save]); see `layouts`.
WORLD2 = ["2,1,1,2,1,allgather", "1,2,1,1,1,allgather", "1,1,2,1,2,alltoall", "2,1,2,1,1,alltoall"]
WORLD4 = ["2,2,1,2,1,allgather,save", "1,2,2,1,2,alltoall"]
NUM_MICROBATCHES = 4
CAPACITY = 32


def job_config(**parallel) -> JobConfig:
    cfg = load_config(CONFIG, ["parallel.micro_batch_size=1"])
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel))


def global_batch(seed: int):
    """NUM_MICROBATCHES packed rows of CAPACITY tokens (several sequences each), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    seqs, rows = [], 0
    while True:
        seqs.append(torch.randint(1, 128, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g))
        batch = pack(seqs, CAPACITY)
        if batch.tokens.shape[0] > NUM_MICROBATCHES:
            batch = pack(seqs[:-1], CAPACITY)
            break
        rows = batch.tokens.shape[0]
    assert rows == NUM_MICROBATCHES
    return packed_microbatches(batch, 1)


def local_batch(trainer, seed: int):
    from megatron.core import parallel_state as ps

    rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return shard_for_data_parallel(global_batch(seed), rank, size)


def sft_step(trainer, seed: int) -> dict:
    mbs = local_batch(trainer, seed)
    n = float(trainer.dp_sum(local_loss_tokens(mbs)))
    return trainer.train_step(mbs, sft_loss(n))


def all_logprobs(trainer, seed: int) -> torch.Tensor:
    """Post-step logprobs of the whole global batch, gathered over DP: [M, CAPACITY]."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    local = torch.cat(trainer.forward_logprobs(local_batch(trainer, seed)))
    parts = [torch.empty_like(local) for _ in range(ps.get_data_parallel_world_size())]
    dist.all_gather(parts, local, group=ps.get_data_parallel_group())
    return torch.cat(parts)


def exported(trainer) -> dict[str, torch.Tensor]:
    from r1_megatron.rollout.weight_export import export_weights

    stream = export_weights(trainer.unwrapped, trainer.cfg.model, bucket_bytes=64 * 1024)
    return {k: v.clone() for k, v in stream}


def start(cfg: JobConfig):
    from r1_megatron.parallel.groups import init_process_groups

    return init_process_groups(cfg)


def build(cfg: JobConfig, world: int):
    from r1_megatron.parallel.device import seed_all, select_device
    from r1_megatron.parallel.groups import resolve_layout, set_layout
    from r1_megatron.train.trainer import Trainer

    layout = resolve_layout(cfg, world)
    set_layout(layout)
    seed_all(cfg.seed)
    return Trainer(cfg, layout, select_device(cfg.parallel.device))  # the CPU unless a scenario asks for CUDA


def save_rank0(obj, path: Path) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(obj, path)


# ------------------------------------------------------------------------------------------------
def reference(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt
    from r1_megatron.checkpoint.hf import export_weights as single_rank_export

    cfg = job_config()
    layout, device = start(cfg)
    from r1_megatron.train.trainer import Trainer

    trainer = Trainer(cfg, layout, device)
    init = ckpt.save(trainer, out / "init")
    metrics = sft_step(trainer, seed=1)
    weights = exported(trainer)
    table = {k: v.clone() for k, v in single_rank_export(trainer.unwrapped, cfg.model)}
    torch.save(
        {"metrics": metrics, "weights": weights, "table_export": table, "logprobs": all_logprobs(trainer, 1),
         "init": str(init)},
        out / "reference.pt",
    )


def layouts(out: Path, init: str, specs: list[str]) -> None:
    import torch.distributed as dist

    from r1_megatron.train import checkpointing as ckpt

    results = {}
    started = False
    for spec in specs:
        tp, pp, ep, etp, dp, dispatcher, *save = spec.split(",")
        cfg = job_config(tp=int(tp), pp=int(pp), ep=int(ep), etp=int(etp), dp=int(dp), dispatcher=dispatcher)
        if not started:
            start(cfg)
            started = True
        trainer = build(cfg, dist.get_world_size())
        ckpt.load(trainer, init, with_optimizer=False)
        if save:  # the initial weights again, now saved from this layout (for the converter test)
            ckpt.save(trainer, out / f"ckpt_{spec.replace(',', '_')}")
        metrics = sft_step(trainer, seed=1)
        results[spec] = {
            "metrics": metrics, "weights": exported(trainer), "logprobs": all_logprobs(trainer, 1)
        }
        del trainer
        gc.collect()
    save_rank0(results, out / "layouts.pt")


def crash(out: Path) -> None:
    """1 step, save (step 1), 1 step, then a save that SIGKILLs every rank after writing its shards."""
    from r1_megatron.train import checkpointing as ckpt

    cfg = job_config(tp=2, ep=2, dispatcher="alltoall")
    start(cfg)
    trainer = build(cfg, 2)
    sft_step(trainer, seed=20)
    ckpt.save(trainer, out / "ckpt", extra={"data_position": 1})
    save_rank0({"logprobs": all_logprobs(trainer, 99)}, out / "before_crash.pt")
    sft_step(trainer, seed=21)

    def die(tmp: Path) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    ckpt.save(trainer, out / "ckpt", extra={"data_position": 2}, on_written=die)


def recover(out: Path) -> None:
    """After `crash`: resume from `latest`; then the bit-exact resume and the resharding checks."""
    from r1_megatron.train import checkpointing as ckpt

    cfg = job_config(tp=2, ep=2, dispatcher="alltoall")
    start(cfg)
    trainer = build(dataclasses.replace(cfg, seed=cfg.seed + 7), 2)  # other init: the load must win
    extra = ckpt.resume(trainer, out / "ckpt")
    result = {"crash": {"extra": extra, "step": trainer.step, "logprobs": all_logprobs(trainer, 99)}}
    # Resume: steps 2-4, save, steps 5-6; a fresh trainer loads the save and redoes steps 5-6.
    pos = extra["data_position"]
    for s in range(pos, 4):
        sft_step(trainer, seed=20 + s)
    saved = ckpt.save(trainer, out / "ckpt", extra={"data_position": 4})
    logprobs_at_save = all_logprobs(trainer, 99)
    after = [sft_step(trainer, seed=20 + s)["loss"] for s in (4, 5)]
    del trainer
    gc.collect()
    fresh = build(dataclasses.replace(cfg, seed=cfg.seed + 99), 2)
    extra = ckpt.resume(fresh, out / "ckpt")
    resumed = [sft_step(fresh, seed=20 + s)["loss"] for s in range(extra["data_position"], 6)]
    result["resume"] = {"after": after, "resumed": resumed, "extra": extra, "step": fresh.step,
                        "latest": ckpt.latest(out / "ckpt").name, "saved": saved.name}
    del fresh
    gc.collect()
    # Reshard: the step-4 checkpoint (tp2, ep2) read at (tp1, ep1, dp2) and at (pp2, dp1).
    result["reshard"] = {"tp2_ep2": logprobs_at_save}
    for name, changes in (("tp1_ep1", dict(tp=1, ep=1, etp=1)), ("pp2", dict(tp=1, ep=1, etp=1, pp=2))):
        trainer = build(job_config(**changes), 2)
        extra = ckpt.load(trainer, saved)
        logprobs = all_logprobs(trainer, 99)
        result["reshard"][name] = {"logprobs": logprobs, "step": trainer.step, "extra": extra}
        del trainer
        gc.collect()
    save_rank0(result, out / "recover.pt")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mode, out_dir, *rest = sys.argv[1:]
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    {"reference": lambda: reference(out_path), "layouts": lambda: layouts(out_path, rest[0], rest[1:]),
     "crash": lambda: crash(out_path), "recover": lambda: recover(out_path)}[mode]()

"""Worker side of tests/dist/test_resume_layouts.py: `python tests/dist/_resume_scenarios.py MODE OUT [LAYOUT]`.

Modes (results go to OUT as torch files written by rank 0):
  save OUT            world 4 at (pp2, ep2, dp2): 2 SFT steps, save with optimizer (OUT/ckpt) and
                      without (OUT/noopt); then step 3 uninterrupted: its loss and exported weights
  resume OUT LAYOUT   at LAYOUT ("tp,pp,ep,etp,dp,dispatcher"): a trainer of another init resumes
                      OUT/ckpt and takes step 3. With "refuse" after the layout it also resumes
                      OUT/noopt: refused by default, and with checkpoint.allow_fresh_optimizer it
                      loads and takes step 3 with a fresh Adam (the negative control)
  gpu OUT             world 1 on CUDA with the distributed optimizer (model-space format): 2 steps,
                      save, step 3 uninterrupted; resumed into the distributed and into the plain
                      optimizer (the flat per-rank ranges read back as whole tensors), step 3
"""

from __future__ import annotations

import dataclasses
import faulthandler
import gc
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist._scenarios import build, exported, job_config, save_rank0, sft_step, start  # noqa: E402

SAVE_LAYOUT = "1,2,2,1,2,alltoall"  # (tp, pp, ep, etp, dp): pp2, ep2 at world 4


def layout_config(spec: str, **checkpoint):
    tp, pp, ep, etp, dp, dispatcher = spec.split(",")
    cfg = job_config(tp=int(tp), pp=int(pp), ep=int(ep), etp=int(etp), dp=int(dp), dispatcher=dispatcher)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, **checkpoint))


def gpu_config(distributed: bool):
    cfg = job_config(device="cuda", backend="nccl")
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, distributed_optimizer=distributed))


def step3(trainer) -> dict:
    metrics = sft_step(trainer, seed=3)
    return {"loss": metrics["loss"], "weights": exported(trainer), "step": trainer.step}


def save(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt

    cfg = layout_config(SAVE_LAYOUT)
    start(cfg)
    trainer = build(cfg, 4)
    for seed in (1, 2):
        sft_step(trainer, seed=seed)
    ckpt.save(trainer, out / "ckpt", extra={"data_position": 2})
    ckpt.save(trainer, out / "noopt", extra={"data_position": 2}, with_optimizer=False)
    save_rank0(step3(trainer), out / "uninterrupted.pt")


def resume(out: Path, spec: str, refuse: bool) -> None:
    import torch.distributed as dist

    from r1_megatron.train import checkpointing as ckpt

    cfg = layout_config(spec)
    start(cfg)
    world = dist.get_world_size()
    trainer = build(dataclasses.replace(cfg, seed=cfg.seed + 7), world)  # another init: the load must win
    extra = ckpt.resume(trainer, out / "ckpt")
    result = {"extra": extra, **step3(trainer)}
    del trainer
    gc.collect()
    if refuse:
        trainer = build(cfg, world)
        try:
            ckpt.resume(trainer, out / "noopt")
            result["refused"] = None
        except ckpt.CheckpointError as e:  # refused before anything was loaded: reuse the trainer
            result["refused"] = str(e)
        trainer.cfg = layout_config(spec, allow_fresh_optimizer=True)
        fresh_extra = ckpt.resume(trainer, out / "noopt")
        result["fresh"] = {"extra": fresh_extra, **step3(trainer)}
    save_rank0(result, out / f"resume_{spec.replace(',', '_')}.pt")


def gpu(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt
    from r1_megatron.train.trainer import Trainer

    layout, device = start(gpu_config(True))
    trainer = Trainer(gpu_config(True), layout, device)
    for seed in (1, 2):
        sft_step(trainer, seed=seed)
    ckpt.save(trainer, out / "ckpt")
    result = {"uninterrupted": step3(trainer), "optimizer": type(trainer.optimizer.chained_optimizers[0]).__name__}
    del trainer
    gc.collect()
    for name, distributed in (("distributed", True), ("plain", False)):
        cfg = gpu_config(distributed)
        trainer = Trainer(dataclasses.replace(cfg, seed=cfg.seed + 7), layout, device)
        result[name] = {"extra": ckpt.resume(trainer, out / "ckpt"), **step3(trainer)}
        del trainer
        gc.collect()
    save_rank0(result, out / "gpu.pt")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mode, out_dir, *rest = sys.argv[1:]
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    if mode == "save":
        save(out_path)
    elif mode == "gpu":
        gpu(out_path)
    else:
        resume(out_path, rest[0], refuse=rest[1:] == ["refuse"])

"""Worker side of tests/dist/test_rl_mtp.py: `python tests/dist/_mtp_scenarios.py MODE OUT_DIR [ARGS...]`.

One step on micro_moe (the batch of tests/dist/_scenarios.py) inside `rl_mtp` (rl/mtp.py):
  grads OUT             world 1: every parameter's gradient with the MTP loss off, on with the trunk
                        detached, on attached, with grad clipping off (the head's gradients would
                        rescale the trunk's through the clip); the initial checkpoint; then the
                        detached step with the config's clip: its metrics and exported weights (the
                        split-invariance reference, as in tests/dist/test_split_invariance.py)
  layouts OUT INIT L... each layout "tp,pp,ep,etp,dp,dispatcher": load INIT, the detached step, export
"""

from __future__ import annotations

import dataclasses
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist._scenarios import build, exported, job_config, save_rank0, sft_step, start  # noqa: E402

COEF = 0.5
RUNS = {"off": (0.0, True), "detached": (COEF, True), "attached": (COEF, False)}


def unclipped(cfg):
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, clip_grad=0.0))


def step(trainer, coef: float, detach: bool) -> dict:
    from r1_megatron.rl.mtp import rl_mtp

    with rl_mtp(trainer.unwrapped, coef, detach):
        return sft_step(trainer, seed=1)


def grads(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt

    cfg = job_config()
    start(cfg)
    result = {}
    for name, (coef, detach) in RUNS.items():
        trainer = build(unclipped(cfg), 1)  # same seed: the same initial weights each time
        if name == "off":
            result["init"] = str(ckpt.save(trainer, out / "init"))
        metrics = step(trainer, coef, detach)
        # DDP's main_grad buffers keep this step's gradients until the next step zeroes them.
        result[name] = {
            "grads": {n: p.main_grad.clone() for n, p in trainer.unwrapped.named_parameters()},
            "metrics": metrics,
        }
        del trainer
        gc.collect()
    trainer = build(cfg, 1)
    result["split"] = {"metrics": step(trainer, *RUNS["detached"]), "weights": exported(trainer)}
    result["num_layers"] = cfg.model.num_layers
    torch.save(result, out / "grads.pt")


def layouts(out: Path, init: str, specs: list[str]) -> None:
    import torch.distributed as dist

    from r1_megatron.train import checkpointing as ckpt

    results = {}
    for i, spec in enumerate(specs):
        tp, pp, ep, etp, dp, dispatcher = spec.split(",")
        cfg = job_config(tp=int(tp), pp=int(pp), ep=int(ep), etp=int(etp), dp=int(dp), dispatcher=dispatcher)
        if i == 0:
            start(cfg)
        trainer = build(cfg, dist.get_world_size())
        ckpt.load(trainer, init, with_optimizer=False)
        results[spec] = {"metrics": step(trainer, *RUNS["detached"]), "weights": exported(trainer)}
        del trainer
        gc.collect()
    save_rank0(results, out / "layouts.pt")


if __name__ == "__main__":
    mode, out_dir, *rest = sys.argv[1:]
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    {"grads": lambda: grads(out_path), "layouts": lambda: layouts(out_path, rest[0], rest[1:])}[mode]()

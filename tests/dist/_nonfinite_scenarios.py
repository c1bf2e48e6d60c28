"""Worker of tests/dist/test_nonfinite.py: `python tests/dist/_nonfinite_scenarios.py OUT_DIR`, 4 ranks.

At (tp2, pp2) on micro_moe: a normal step and a save (step 1); a NaN put into one gradient element of
one parameter on rank 3 only (a tensor hook, so DDP reduces and the optimizer sees it as a real NaN
gradient); the next step normal; a save with a NaN weight on rank 3; three NaN steps in a row; and a
fresh trainer with optim.skip_nonfinite=false (the negative control). Each rank writes what it saw to
OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import copy
import dataclasses
import faulthandler
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist._scenarios import build, job_config, sft_step, start  # noqa: E402

POISONED_RANK = 3


def _poisoned_param(trainer) -> torch.nn.Parameter:
    """A decoder weight of this rank's stage (rank 3: pp stage 1, tp rank 1)."""
    return next(p for n, p in trainer.unwrapped.named_parameters() if "decoder.layers" in n and p.dim() == 2)


def _poison_grads(trainer):
    """On POISONED_RANK, make one element of one parameter's gradient NaN; returns the hook handle."""
    if dist.get_rank() != POISONED_RANK:
        return None

    def nan_one(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g.view(-1)[0] = float("nan")
        return g

    return _poisoned_param(trainer).register_hook(nan_one)


def _state(trainer) -> dict:
    """Everything a skipped step must leave alone, cloned."""
    from megatron.core import parallel_state

    opt = trainer.optimizer
    return {
        "weights": {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()},
        "main": [p.detach().clone() for o in opt.chained_optimizers for g in o.optimizer.param_groups
                 for p in g["params"]],
        "optimizer": copy.deepcopy([o.optimizer.state_dict() for o in opt.chained_optimizers]),
        "bias": [m.expert_bias.clone() for m in trainer.unwrapped.modules()
                 if getattr(m, "expert_bias", None) is not None],
        "step": trainer.step,
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt
    from r1_megatron.train.nonfinite import NonFiniteError, first_nonfinite_weight

    cfg = job_config(tp=2, pp=2, ep=1, etp=2, dispatcher="allgather")
    start(cfg)
    trainer = build(cfg, 4)
    res: dict = {"first": sft_step(trainer, seed=1)}
    ckpt.save(trainer, out / "ckpt")
    res["has_bias"] = bool(_state(trainer)["bias"])

    # A NaN gradient on one rank: skipped everywhere, nothing moves.
    before = _state(trainer)
    hook = _poison_grads(trainer)
    res["nan_step"] = sft_step(trainer, seed=2)
    if hook is not None:
        hook.remove()
    after = _state(trainer)
    res["untouched"] = {k: _same(before[k], after[k]) for k in before}

    # The next step trains normally.
    res["next_step"] = sft_step(trainer, seed=3)
    now = _state(trainer)
    res["next_moved"] = not _same(after["weights"], now["weights"])
    res["next_bias_moved"] = bool(now["bias"]) and not _same(after["bias"], now["bias"])
    res["next_finite"] = first_nonfinite_weight(trainer.unwrapped) is None

    # A save with a NaN weight on one rank is refused on every rank; `latest` keeps naming step 1.
    p = _poisoned_param(trainer)
    kept = p.detach().clone()
    if dist.get_rank() == POISONED_RANK:
        with torch.no_grad():
            p.view(-1)[5] = float("nan")
    try:
        ckpt.save(trainer, out / "ckpt")
        res["save_error"] = None
    except ckpt.CheckpointError as e:
        res["save_error"] = str(e)
    with torch.no_grad():
        p.copy_(kept)
    res["latest_after_refusal"] = (out / "ckpt" / "latest").read_text().strip()

    # Three in a row stop the run.
    hook = _poison_grads(trainer)
    res["streak"] = []
    try:
        for seed in (4, 5, 6):
            res["streak"].append(sft_step(trainer, seed=seed)["update_ok"])
        res["stop_error"] = None
    except NonFiniteError as e:
        res["stop_error"] = str(e)
    if hook is not None:
        hook.remove()

    # Negative control: without the guard the NaN reaches the weights.
    del trainer
    unguarded = build(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, skip_nonfinite=False)), 4)
    sft_step(unguarded, seed=1)
    hook = _poison_grads(unguarded)
    res["unguarded_step"] = sft_step(unguarded, seed=2)
    bad = first_nonfinite_weight(unguarded.unwrapped)
    res["unguarded_nonfinite_weight"] = None if bad is None else list(bad)
    torch.save(res, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)
    main(Path(sys.argv[1]))

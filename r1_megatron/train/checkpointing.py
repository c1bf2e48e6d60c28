"""A Trainer's checkpoints: its model chunks, optimizer, scheduler and step handed to
checkpoint/dist.py as one TrainState, and the step it loads read back.

Weights that hold a NaN/Inf are never written (`refuse_nonfinite`: the non-finite guard's check,
train/nonfinite.py, on every rank before the collective save starts; the HF export, train/weights.py,
runs the same check).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from r1_megatron.checkpoint import dist as dist_ckpt
from r1_megatron.checkpoint.dist import LATEST, TrainState, latest, load_model_weights, step_dir_name
from r1_megatron.checkpoint.integrity import CheckpointError
from r1_megatron.parallel.device import seed_all
from r1_megatron.train.nonfinite import first_nonfinite_weight
from r1_megatron.train.trainer import Trainer

# Read through this module by the loops and by tests that take checkpoints.
__all__ = ["CheckpointError", "latest", "load", "load_model_weights", "refuse_nonfinite", "resume", "save",
           "step_dir_name"]


def train_state(trainer: Trainer) -> TrainState:
    """What a checkpoint of `trainer` holds (the trainer's own objects, not copies)."""
    return TrainState(model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                      cfg=trainer.cfg, layout=trainer.layout, step=trainer.step, replicas=trainer.replicas,
                      reseed=seed_all)


def save(
    trainer: Trainer,
    root: str | Path,
    *,
    extra: dict | None = None,
    on_written: Callable[[Path], None] | None = None,
    with_optimizer: bool = True,
) -> Path:
    """checkpoint/dist.py `save` of the trainer as step_<trainer.step> under `root` (collective)."""
    root = Path(root)
    refuse_nonfinite(trainer, root / step_dir_name(trainer.step), "save", keeps=root / LATEST)
    return dist_ckpt.save(train_state(trainer), root, extra=extra, on_written=on_written,
                          with_optimizer=with_optimizer)


def refuse_nonfinite(trainer: Trainer, target: Path, action: str, keeps: Path | None = None) -> None:
    """Raise a one-line CheckpointError naming `target` and the first NaN/Inf weight (by name and rank)
    before anything is written to it; with `keeps`, a `latest` pointer, also what it still names.
    Collective: every rank refuses alike."""
    bad = first_nonfinite_weight(trainer.unwrapped)
    if bad is not None:
        tail = ""
        if keeps is not None:
            previous = keeps.read_text().strip() if keeps.is_file() else "no checkpoint"
            tail = f"; {keeps} still names {previous}"
        raise CheckpointError(f"{target}: refusing to {action} non-finite weights (first: {bad[1]} on "
                              f"rank {bad[0]}){tail}")


def load(trainer: Trainer, path: str | Path, *, with_optimizer: bool = True, verify: str | None = None) -> dict:
    """checkpoint/dist.py `load` into the trainer (any layout); returns the caller's `extra` state."""
    state = train_state(trainer)
    extra = dist_ckpt.load(state, path, with_optimizer=with_optimizer, verify=verify)
    trainer.step = state.step
    return extra


def resume(trainer: Trainer, root: str | Path) -> dict | None:
    """Load `root`'s newest intact checkpoint if there is one; returns its extra state, or None."""
    path = dist_ckpt.newest_intact(root, trainer.cfg.checkpoint.verify)
    return None if path is None else load(trainer, path, verify="off")  # checked just now

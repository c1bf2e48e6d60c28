"""Distributed training checkpoints: save, load, reshard (megatron dist_checkpointing, torch_dist).

What is saved comes in as a TrainState (model chunks, optimizer, scheduler, step, ...); the Trainer's
own save / load / resume, which build it, are train/checkpointing.py.

A checkpoint root holds one directory per saved step and a `latest` pointer:

  <root>/step_000003/   megatron dist checkpoint: model + optimizer (sharded, reshardable), per-rank RNG
                        (common.pt: step, LR schedule, caller state such as the data position, layout)
                        model_card.yaml and config.yaml: the model card and the resolved job config
                        r1m_manifest.json: size and CRC32 of every file but the two YAML files
                        (checked on their own), verified before a load (integrity.py);
                        resume falls back to the newest intact checkpoint
  <root>/latest         the name of the newest complete step directory

Atomicity: every rank writes into `<root>/.tmp-step_000003`; after all ranks are done, rank 0 writes
the card and config, renames the directory to `step_000003`, and only then replaces `latest` (write
a temp file, fsync, rename). A crash at any point leaves `latest` naming the previous complete
checkpoint; a leftover temp directory is removed by the next save.

Model weights are stored under megatron's own sharded keys, so `r1m convert` / `r1m score` read a
training checkpoint directly, at any layout. So are the optimizer's tensors (Adam moments, fp32 main
params): each under the key of the model parameter it belongs to, megatron's sharded optimizer state
with no chained-optimizer prefix (its dense/expert split changes with ep) and, for the distributed
optimizer, the model-space format. A checkpoint written at one (tp, pp, ep, dp) therefore resumes at
any other with weights, Adam moments and step, LR schedule, expert bias and redundant-expert state.

Per-rank RNG state cannot be mapped onto another layout (the streams belong to ranks). At the same
layout it is restored exactly; at another, every generator is reseeded from (seed, step) through
`seed_all`, whose megatron tracker adds its usual per-TP/EP-rank offsets: deterministic, and logged.
A resume that cannot carry the optimizer state (a weights-only checkpoint, or one from before this
format) is refused in one line unless `checkpoint.allow_fresh_optimizer` is set; then it is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedObject
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.utils import unwrap_model

from r1_megatron.checkpoint import integrity
from r1_megatron.checkpoint.integrity import CheckpointError, CorruptCheckpoint
from r1_megatron.checkpoint.mcore_io import CARD_FILE
from r1_megatron.config.schema import JobConfig, ParallelConfig

LATEST = "latest"
CONFIG_FILE = "config.yaml"
# Common-state key of the Adam step; its presence marks optimizer tensors saved in the layout-free form.
OPTIMIZER_STEP = "optimizer_step"
# Keys name the model parameter only, so they are the same at every layout: no `chained_<i>.` prefix,
# and the distributed optimizer in its model-space format (mcore's dp_reshardable reshards only in DP).
_OPTIMIZER_METADATA = {"chained_optim_avoid_prefix": True,
                       "distrib_optim_sharding_type": "fully_sharded_model_space"}

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """One rank's share of a training checkpoint, handed over as torchtitan's CheckpointManager takes
    it: the model chunks, the optimizer and the LR scheduler (both None: forward-only, weights only),
    the job config (model card, seed, checkpoint options), this run's layout, the optimizer steps
    taken (`load` sets it), and the redundant-expert state (state_dict / load_state_dict; None
    without routed experts), and the reseed used when a checkpoint of another layout loads."""

    model: list[torch.nn.Module]
    optimizer: Any | None
    scheduler: Any | None
    cfg: JobConfig
    layout: ParallelConfig
    step: int = 0
    replicas: Any | None = None
    reseed: Callable[[int], None] | None = None  # seeds every generator (parallel/device.py seed_all)

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The GPTModel of this stage, under any DDP / Float16Module wrapper."""
        return unwrap_model(self.model[0])


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None when there is none."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout_key(train_state: TrainState) -> dict:
    p = train_state.layout
    return {"world": dist.get_world_size(), "tp": p.tp, "pp": p.pp, "ep": p.ep, "etp": p.etp, "dp": p.dp}


def model_sharded_state_dict(model: torch.nn.Module) -> dict:
    """megatron's sharded state dict of one GPTModel chunk (keys as a single-rank model has them)."""
    # The MTP stage ties its embedding copy to the first stage's and needs the DP group for that.
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return model.sharded_state_dict(metadata={"dp_cp_group": dp_cp_group})


def _sharded_state(train_state: TrainState) -> dict:
    state = {"model": model_sharded_state_dict(train_state.unwrapped)}
    # One RNG object per global rank: it only means something at the same layout.
    rank, world = dist.get_rank(), dist.get_world_size()
    state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def _optimizer_state(train_state: TrainState, model_sd: dict, *, loading: bool) -> tuple[dict, dict]:
    """megatron's sharded optimizer state of this rank, and its sharded tensors numbered in order.

    Only the tensors go into the checkpoint, where their keys and global offsets place them at any
    layout; the rest of the structure (param groups by position, the chained optimizer's list) is
    this layout's, so the loader takes it from its own optimizer and restores the Adam step apart.
    (A dict, not a list: dist_checkpointing merges lists by length with the saved common state.)"""
    local = train_state.optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=_OPTIMIZER_METADATA)
    return local, dict(enumerate(v for v in nested_values(local) if isinstance(v, ShardedBase)))


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _adam_step(optimizer) -> int:
    """Adam's step count (the same in every sub-optimizer): per parameter in torch's Adam, per
    param group in TE/apex FusedAdam; 0 before the first update."""
    steps = [0]
    for sub in _sub_optimizers(optimizer):
        inner = sub.optimizer
        steps += [int(s["step"]) for s in inner.state.values() if "step" in s]
        steps += [int(g["step"]) for g in inner.param_groups if g.get("step") is not None]
    return max(steps)


def _load_optimizer(train_state: TrainState, local: dict, requested: dict, loaded: dict, step: int) -> None:
    """Fill this layout's optimizer state structure with the loaded tensors and the Adam step, then
    load it. The step goes where each megatron optimizer reads it on load: `common_step` in the state
    of a plain optimizer over torch's Adam (megatron copies it to every parameter), `step` in every
    param group otherwise (FusedAdam; the distributed optimizer, whose groups carry it)."""
    position = {id(leaf): i for i, leaf in requested.items()}

    def fill(value):
        if isinstance(value, ShardedBase):
            return loaded[position[id(value)]]
        if isinstance(value, LocalNonpersistentObject):
            return value.unwrap()
        return value

    filled = dict_list_map_outplace(fill, local)
    subs = _sub_optimizers(train_state.optimizer)
    parts = [filled] if len(subs) == 1 else [filled[i] for i in range(len(subs))]
    for sub, part in zip(subs, parts):
        inner = part.get("optimizer", part)  # the Float16 and distributed optimizers wrap torch's dict
        if isinstance(sub.optimizer, torch.optim.Adam) and "state" in inner:
            inner["state"]["common_step"] = torch.tensor(float(step))
        else:
            for group in inner["param_groups"]:
                group["step"] = step
    train_state.optimizer.load_state_dict(filled)


def _refuse_fresh_optimizer(train_state: TrainState, path: Path, why: str) -> None:
    """One loud line: refused unless checkpoint.allow_fresh_optimizer."""
    line = f"{path}: {why}, so a resume would restart Adam (moments and step) from zero"
    if not train_state.cfg.checkpoint.allow_fresh_optimizer:
        raise CheckpointError(f"{line}; set checkpoint.allow_fresh_optimizer=true to accept that")
    if dist.get_rank() == 0:
        log.warning("RESUMING WITH A FRESH OPTIMIZER: %s (checkpoint.allow_fresh_optimizer=true)", line)


def _reseed(train_state: TrainState, saved: dict | None) -> None:
    """Per-rank RNG streams do not map onto another layout: reseed deterministically instead."""
    seed = (train_state.cfg.seed + 1_000_003 * train_state.step) % 2**31
    train_state.reseed(seed)
    if dist.get_rank() == 0:
        log.warning("RNG not restored: checkpoint layout %s, this run %s; reseeded from (seed %d, step %d)",
                    saved, _layout_key(train_state), train_state.cfg.seed, train_state.step)


def save(
    train_state: TrainState,
    root: str | Path,
    *,
    extra: dict | None = None,
    on_written: Callable[[Path], None] | None = None,
    with_optimizer: bool = True,
) -> Path:
    """Save `train_state` (model, optimizer, RNG, step, schedule) plus `extra` (e.g. the data position)
    under `root` as step_<train_state.step>; collective over all ranks. Returns the final directory.
    with_optimizer=False writes no optimizer state (a smaller, weights-and-schedule checkpoint).

    `on_written(tmp_dir)` runs on every rank after the shards are written and before the commit
    (tests use it to kill a process mid-save)."""
    root = Path(root)
    name = step_dir_name(train_state.step)
    tmp, final = root / f".tmp-{name}", root / name
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale)  # left by a crashed save (one job writes a root at a time)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(train_state)
    if with_optimizer:
        state["optimizer"] = _optimizer_state(train_state, state["model"], loading=False)[1]
        state[OPTIMIZER_STEP] = _adam_step(train_state.optimizer)
    state["trainer"] = {"step": train_state.step, "scheduler": train_state.scheduler.state_dict()}
    state["extra"] = dict(extra or {})
    state["layout"] = _layout_key(train_state)
    if train_state.replicas is not None:  # expert loads and the redundant-expert placement
        state["replicas"] = train_state.replicas.state_dict()
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy)
    written = integrity.gather_digests(tmp, checksum=train_state.cfg.checkpoint.verify == "full")
    if on_written is not None:
        on_written(tmp)
    dist.barrier()
    if rank == 0:
        (tmp / CARD_FILE).write_text(yaml.safe_dump(dataclasses.asdict(train_state.cfg.model), sort_keys=False))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(train_state.cfg), sort_keys=False))
        integrity.write_manifest(tmp, written)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)  # a re-save of the same step (e.g. after a resume)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, name)
    dist.barrier()
    return final


def load(
    train_state: TrainState, path: str | Path, *, with_optimizer: bool = True, verify: str | None = None
) -> dict:
    """Load a checkpoint directory (any layout) into `train_state`; returns the caller's `extra` state.

    Weights, step and LR schedule always load, and with_optimizer the optimizer state too, resharded
    to this layout; a checkpoint without it is refused unless checkpoint.allow_fresh_optimizer.
    RNG state loads at the same layout; at another every generator is reseeded from (seed, step).
    "_optimizer_restored" and "_rng_restored" in the returned dict say what happened. The files
    are checked against the manifest first (`verify`, default checkpoint.verify; see integrity.py)."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no metadata.json)")
    integrity.verify(path, verify or train_state.cfg.checkpoint.verify)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_layout = common.get("layout") == _layout_key(train_state)
    with_optimizer = with_optimizer and train_state.optimizer is not None
    if with_optimizer and OPTIMIZER_STEP not in common:
        _refuse_fresh_optimizer(train_state, path, "the checkpoint holds no optimizer state that maps onto a layout")
        with_optimizer = False
    sharded = _sharded_state(train_state)
    if with_optimizer:
        local, requested = _optimizer_state(train_state, sharded["model"], loading=True)
        sharded["optimizer"] = dict(requested)  # dist_checkpointing rewrites the dict it is given
    if not same_layout:
        del sharded["rng"]
    try:
        state = dist_checkpointing.load(sharded, str(path))
    except Exception as e:  # dist_checkpointing raises many types; name the path and the cause
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot load into this model/layout: {first}") from e
    _apply_model_state(train_state.unwrapped, state["model"], path)
    if with_optimizer:
        _load_optimizer(train_state, local, requested, state["optimizer"], int(common[OPTIMIZER_STEP]))
    if "trainer" in common and train_state.scheduler is not None:
        train_state.step = int(common["trainer"]["step"])
        train_state.scheduler.load_state_dict(common["trainer"]["scheduler"])
    if train_state.replicas is not None and "replicas" in common:  # after the weights and the optimizer:
        train_state.replicas.load_state_dict(common["replicas"])  # a re-plan moves both
    if same_layout:
        _set_rng_state(state["rng"])
    elif train_state.optimizer is not None:  # training goes on at another layout (not forward-only use)
        _reseed(train_state, common.get("layout"))
    extra = dict(common.get("extra", {}))
    extra["_rng_restored"] = same_layout
    extra["_optimizer_restored"] = with_optimizer
    return extra


def load_model_weights(model: torch.nn.Module, path: str | Path, verify: str = "full") -> None:
    """Load only the weights of a checkpoint (any layout, training or single-rank) into one model chunk
    (collective: every rank calls it), after checking the files against the manifest."""
    integrity.verify(path, verify)
    try:
        state = dist_checkpointing.load({"model": model_sharded_state_dict(model)}, str(path))
    except Exception as e:  # dist_checkpointing raises many types; name the path and the cause
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot load into this model/layout: {first}") from e
    _apply_model_state(model, state["model"], Path(path))


def _apply_model_state(model: torch.nn.Module, state: dict, path: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise CheckpointError(f"{path}: {'missing' if missing else 'unexpected'} model key '{key}'")


def is_training_checkpoint(path: str | Path) -> bool:
    """A directory written by `save` (it carries the resolved job config)."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / "metadata.json").is_file()


def newest_intact(root: str | Path, verify: str = "full") -> Path | None:
    """`root`'s latest checkpoint, or, when its files fail the manifest check (or `latest` names no
    complete checkpoint), the newest older one that passes, logged loudly. None when `root` has no
    `latest`; CorruptCheckpoint when none is intact. Collective under torch.distributed."""
    root = Path(root)
    try:
        named, damage = latest(root), None
    except CheckpointError as e:
        named, damage = None, e
    if named is None and damage is None:
        return None
    older = sorted((p for p in root.glob("step_*") if (p / "metadata.json").is_file()), reverse=True)
    candidates = [named] if named else []
    candidates += [p for p in older if named is None or p.name < named.name]
    for path in candidates:
        try:
            integrity.verify(path, verify)
        except CorruptCheckpoint as e:
            log.error("checkpoint %s is damaged, skipped: %s", path, e)
            damage = damage or e
            continue
        if damage is not None:
            log.error("!!! RESUMING FROM AN OLDER CHECKPOINT %s: the latest is damaged (%s)", path, damage)
        return path
    raise CorruptCheckpoint(f"{root}: no intact checkpoint to resume from; the latest: {damage}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

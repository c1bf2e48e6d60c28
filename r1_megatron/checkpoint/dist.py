"""Distributed training checkpoints: save, resume, reshard (megatron dist_checkpointing, torch_dist).

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
training checkpoint directly, at any layout. Loading at a different layout reshards the weights; the
optimizer moments and the per-rank RNG state are then not restored, and the caller is told so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from r1_megatron.checkpoint import integrity
from r1_megatron.checkpoint.integrity import CheckpointError, CorruptCheckpoint
from r1_megatron.checkpoint.mcore_io import CARD_FILE, read_card
from r1_megatron.config.schema import JobConfig, ModelConfig, ParallelConfig
from r1_megatron.rl.train_step import Trainer

LATEST = "latest"
CONFIG_FILE = "config.yaml"
log = logging.getLogger(__name__)


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


def _layout_key(trainer: Trainer) -> dict:
    p = trainer.layout
    return {"world": dist.get_world_size(), "tp": p.tp, "pp": p.pp, "ep": p.ep, "etp": p.etp, "dp": p.dp}


def model_sharded_state_dict(model: torch.nn.Module) -> dict:
    """megatron's sharded state dict of one GPTModel chunk (keys as a single-rank model has them)."""
    # The MTP stage ties its embedding copy to the first stage's and needs the DP group for that.
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return model.sharded_state_dict(metadata={"dp_cp_group": dp_cp_group})


def _sharded_state(trainer: Trainer, *, loading: bool, with_optimizer: bool = True) -> dict:
    model_sd = model_sharded_state_dict(trainer.unwrapped)
    state = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = trainer.optimizer.sharded_state_dict(model_sd, is_loading=loading)
    # One RNG object per global rank: it only means something at the same layout.
    rank, world = dist.get_rank(), dist.get_world_size()
    state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def save(
    trainer: Trainer,
    root: str | Path,
    *,
    extra: dict | None = None,
    on_written: Callable[[Path], None] | None = None,
) -> Path:
    """Save `trainer` (model, optimizer, RNG, step, schedule) plus `extra` (e.g. the data position)
    under `root` as step_<trainer.step>; collective over all ranks. Returns the final directory.

    `on_written(tmp_dir)` runs on every rank after the shards are written and before the commit
    (tests use it to kill a process mid-save)."""
    root = Path(root)
    name = step_dir_name(trainer.step)
    tmp, final = root / f".tmp-{name}", root / name
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale)  # left by a crashed save (one job writes a root at a time)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(trainer, loading=False)
    state["trainer"] = trainer.state_dict()
    state["extra"] = dict(extra or {})
    state["layout"] = _layout_key(trainer)
    if trainer.replicas is not None:  # expert loads and the redundant-expert placement
        state["replicas"] = trainer.replicas.state_dict()
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy)
    written = integrity.gather_digests(tmp, checksum=trainer.cfg.checkpoint.verify == "full")
    if on_written is not None:
        on_written(tmp)
    dist.barrier()
    if rank == 0:
        (tmp / CARD_FILE).write_text(yaml.safe_dump(dataclasses.asdict(trainer.cfg.model), sort_keys=False))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(trainer.cfg), sort_keys=False))
        integrity.write_manifest(tmp, written)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)  # a re-save of the same step (e.g. after a resume)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, name)
    dist.barrier()
    return final


def load(
    trainer: Trainer, path: str | Path, *, with_optimizer: bool = True, verify: str | None = None
) -> dict:
    """Load a checkpoint directory (any layout) into `trainer`; returns the caller's `extra` state.

    Weights, step and LR schedule always load. The optimizer moments and the RNG state load only
    when the checkpoint was written at this exact layout (megatron's chained dense/expert optimizer
    changes shape with ep, so its state is not resharded); "_optimizer_restored" and
    "_rng_restored" in the returned dict say what happened. The files are checked against the
    manifest first (`verify`, default checkpoint.verify; see integrity.py)."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no metadata.json)")
    integrity.verify(path, verify or trainer.cfg.checkpoint.verify)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_layout = common.get("layout") == _layout_key(trainer)
    with_optimizer = with_optimizer and same_layout and "trainer" in common
    sharded = _sharded_state(trainer, loading=True, with_optimizer=with_optimizer)
    if not same_layout:
        del sharded["rng"]
    try:
        state = dist_checkpointing.load(sharded, str(path))
    except Exception as e:  # dist_checkpointing raises many types; name the path and the cause
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot load into this model/layout: {first}") from e
    _apply_model_state(trainer.unwrapped, state["model"], path)
    if with_optimizer:
        trainer.optimizer.load_state_dict(state["optimizer"])
    if "trainer" in common and trainer.scheduler is not None:
        trainer.load_state_dict(common["trainer"])
    if trainer.replicas is not None and "replicas" in common:  # after the weights: moves them on re-plan
        trainer.replicas.load_state_dict(common["replicas"])
    if same_layout:
        _set_rng_state(state["rng"])
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


def resume(trainer: Trainer, root: str | Path) -> dict | None:
    """Load `root`'s newest intact checkpoint if there is one; returns its extra state, or None."""
    path = newest_intact(root, trainer.cfg.checkpoint.verify)
    return None if path is None else load(trainer, path, verify="off")  # checked just now


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


def inference_config(card: ModelConfig, *, tp: int = 1, pp: int = 1, ep: int = 1) -> JobConfig:
    """A job config that runs `card` at (tp, pp, ep) for forward use (scoring, conversion)."""
    parallel = ParallelConfig(
        tp=tp, pp=pp, ep=ep, etp=tp if ep == 1 else 1, sequence_parallel=tp > 1, dispatcher="alltoall"
    )
    return JobConfig(model=card, parallel=parallel)


def open_for_inference(
    ckpt_dir: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, verify: str = "full"
) -> Trainer:
    """Start this process's groups (torchrun environment) at (tp, pp, ep) and build its model chunk,
    loaded from a megatron checkpoint of any layout (weights only). Collective over all ranks."""
    from r1_megatron.parallel.groups import init_process_groups

    cfg = inference_config(read_card(ckpt_dir), tp=tp, pp=pp, ep=ep)
    layout, device = init_process_groups(cfg)
    trainer = Trainer(cfg, layout, device, for_training=False)
    load(trainer, ckpt_dir, with_optimizer=False, verify=verify)
    return trainer


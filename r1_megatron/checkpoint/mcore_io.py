"""Single-rank megatron checkpoints: dist_checkpointing (torch_dist) plus the model card beside it.

Layout of a directory written here:
  metadata.json, .metadata, __*.distcp, common.pt   megatron dist_checkpointing (reshards on load)
  model_card.yaml                                  the ModelConfig the weights belong to
  r1m_manifest.json                                sizes and CRC32s of the files above the card,
                                                   checked before a load
  tokenizer files                                  when the source had them

`save_mcore` also runs under torch.distributed (every rank its model chunk, any layout; the
parallel `r1m convert hf-to-mcore`): the checkpoint is the same as one saved from a single rank.

dist_checkpointing's writer starts a `spawn` multiprocessing manager, so scripts that call `save_mcore`
need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from r1_megatron.checkpoint import integrity
from r1_megatron.checkpoint.hf import ConversionError
from r1_megatron.config.loader import ConfigError, from_dict
from r1_megatron.config.schema import ModelConfig

CARD_FILE = "model_card.yaml"


def is_mcore_dir(path: str | Path) -> bool:
    return (Path(path) / CARD_FILE).is_file() and (Path(path) / "metadata.json").is_file()


def read_card(ckpt_dir: str | Path) -> ModelConfig:
    path = Path(ckpt_dir) / CARD_FILE
    if not path.is_file():
        raise ConversionError(f"{ckpt_dir}: no {CARD_FILE} (not a megatron checkpoint written by r1m)")
    try:
        return from_dict(ModelConfig, yaml.safe_load(path.read_text()) or {}, "model")
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from e


def _sharded_state_dict(model: torch.nn.Module) -> dict:
    from megatron.core import parallel_state

    # GPTModel indexes metadata['dp_cp_group'] on a pipeline stage that holds MTP but not the
    # embedding, and only fills it in when given a dict.
    return model.sharded_state_dict(
        metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    )


def save_mcore(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Save this rank's GPTModel chunk and the card to out_dir (created; must not hold a checkpoint).
    Collective over all ranks when torch.distributed is initialized."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    out = Path(out_dir)
    if (out / "metadata.json").exists():
        raise ConversionError(f"{out}: already holds a checkpoint; choose an empty directory")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(_sharded_state_dict(model), str(out), sharded_strategy=strategy)
    written = integrity.gather_digests(out)
    if rank == 0:
        (out / CARD_FILE).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        integrity.write_manifest(out, written)
    if dist.is_initialized():
        dist.barrier()
    return out


def load_mcore_into(model: torch.nn.Module, ckpt_dir: str | Path, verify: str = "full") -> None:
    """Load a dist checkpoint into an already built model (shapes must match the card), after
    checking its files against the manifest."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    integrity.verify(ckpt_dir, verify)
    try:
        state = dist_checkpointing.load(_sharded_state_dict(model), str(ckpt_dir))
    # torch's CheckpointException derives from BaseException and wraps the cause in a multi-line
    # report whose last line names the key; keep that line.
    except (Exception, CheckpointException) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        cause = lines[-1].split("Exception: ", 1)[-1]
        raise ConversionError(f"{ckpt_dir}: checkpoint does not match {CARD_FILE}: {cause}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ConversionError(f"{ckpt_dir}: {'missing' if missing else 'unknown'} key '{key}'")

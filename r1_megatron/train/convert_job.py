"""`r1m convert`: HF <-> megatron checkpoints, on one process or under torchrun.

  r1m convert hf-to-mcore --hf DIR --out DIR [--card NAME] [--tp N --pp N --ep N] [--verify MODE]
  r1m convert mcore-to-hf --ckpt DIR --out DIR [--tokenizer DIR] [--max-shard-mb N] [--tp N --pp N --ep N]

hf-to-mcore with --tp/--pp/--ep (under torchrun) builds the model split that way and each rank reads
only its own shard of the safetensors files (checkpoint/hf_shard.py), so a 671B model converts on as
many ranks as hold it; the checkpoint is the same as a single-rank conversion's. FP8-blockwise HF
directories (the published DeepSeek-V3/R1) are dequantized on import (hf_io.py).

mcore-to-hf reads a checkpoint of any layout (dist_checkpointing reshards on load). With --tp/--pp/--ep
(under torchrun, tp*pp dividing the world size) the model is loaded split that way and streamed out by
rollout/weight_export.py, so no rank holds the whole model; rank 0 writes the files. The result is the
same, bit for bit, whatever the checkpoint's layout or the conversion's.

The HF side is the published DeepseekV3ForCausalLM (or Qwen2/Llama) layout; the name table is
checkpoint/hf.py. `--card` supplies the fields HF does not store (bias update rate, aux-loss and MTP
loss coefficients) and is checked against config.json on every architecture field.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from r1_megatron.checkpoint import hf, hf_io, mcore_io
from r1_megatron.checkpoint.hf_card import merge_card
from r1_megatron.checkpoint.integrity import CheckpointError
from r1_megatron.config.schema import ModelConfig


def load_hf_model(
    hf_dir: str | Path,
    cfg: ModelConfig | None = None,
    device: torch.device | None = None,
    verify: str = "full",
):
    """Build a single-rank megatron model and fill it from an HF directory. Returns (model, cfg)."""
    from r1_megatron.model.provider import build_model
    from r1_megatron.parallel.device import single_rank_world

    cfg = cfg or hf_io.read_hf_config(hf_dir)
    device = single_rank_world(device=device)
    ckpt = hf_io.HFCheckpoint(hf_dir, verify=verify)
    model = build_model(cfg, device=device)
    hf.import_weights(model, ckpt, cfg, ckpt.keys())
    return model, cfg


def load_mcore_model(ckpt_dir: str | Path, device: torch.device | None = None, verify: str = "full"):
    """Build a single-rank megatron model from its card and load the dist checkpoint. Returns (model, cfg)."""
    from r1_megatron.checkpoint import dist as dist_ckpt
    from r1_megatron.model.provider import build_model
    from r1_megatron.parallel.device import single_rank_world

    cfg = mcore_io.read_card(ckpt_dir)
    device = single_rank_world(device=device)
    model = build_model(cfg, device=device)
    if dist_ckpt.is_training_checkpoint(ckpt_dir):
        # Training checkpoints also hold optimizer and trainer state; only the weights are read.
        dist_ckpt.load_model_weights(model, ckpt_dir, verify)
    else:
        mcore_io.load_mcore_into(model, ckpt_dir, verify)
    return model, cfg


def load_any(path: str | Path, device: torch.device | None = None, verify: str = "full"):
    """A megatron checkpoint written by r1m, or an HF directory (converted on the fly)."""
    if mcore_io.is_mcore_dir(path):
        return load_mcore_model(path, device, verify)
    if (Path(path) / "config.json").is_file():
        return load_hf_model(path, device=device, verify=verify)
    raise hf.ConversionError(
        f"{path}: neither a megatron checkpoint ({mcore_io.CARD_FILE}) nor an HF directory (config.json)"
    )


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    card: str | None = None,
    layout: tuple[int, int, int] = (1, 1, 1),
    verify: str = "full",
) -> Path:
    """Write the megatron checkpoint. `layout` = (tp, pp, ep) of the model split; anything but
    (1, 1, 1), or a world of several ranks, takes the sharded path (each rank reads its shard)."""
    cfg = merge_card(hf_io.read_hf_config(hf_dir), card)
    if layout != (1, 1, 1) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _hf_to_mcore_parallel(hf_dir, out_dir, cfg, layout, verify)
    model, cfg = load_hf_model(hf_dir, cfg, verify=verify)
    out = mcore_io.save_mcore(model, cfg, out_dir)
    hf_io.copy_tokenizer(hf_dir, out)
    return out


def _hf_to_mcore_parallel(
    hf_dir: str | Path, out_dir: str | Path, cfg: ModelConfig, layout: tuple[int, int, int], verify: str
) -> Path:
    import torch.distributed as dist

    from r1_megatron.checkpoint import hf_shard, integrity
    from r1_megatron.parallel.groups import init_process_groups
    from r1_megatron.train.forward import ForwardModel, inference_config

    tp, pp, ep = layout
    job = inference_config(cfg, tp=tp, pp=pp, ep=ep)
    groups, device = init_process_groups(job)
    model = ForwardModel(job, groups, device, load="", on_host=False).trainer.unwrapped
    integrity.verify(hf_dir, verify)  # collective: each rank hashes a share of the files
    ckpt = hf_io.HFCheckpoint(hf_dir, verify="off")
    hf_shard.import_shard(model, ckpt, cfg)
    print(f"rank {dist.get_rank()}: {hf_shard.read_summary(ckpt)}", flush=True)
    out = mcore_io.save_mcore(model, cfg, out_dir)
    if dist.get_rank() == 0:
        hf_io.copy_tokenizer(hf_dir, out)
    return out


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    max_shard_mb: float = 2048,
    layout: tuple[int, int, int] = (1, 1, 1),
    verify: str = "full",
) -> Path:
    """Write the HF directory. `layout` = (tp, pp, ep) of the megatron side; anything but (1, 1, 1),
    or a world of several ranks, takes the multi-rank path. The tokenizer files come from
    `tokenizer`, else from the checkpoint directory, else (a training checkpoint) its data.tokenizer."""
    tokenizer = tokenizer or _training_tokenizer(ckpt_dir)
    if layout != (1, 1, 1) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _mcore_to_hf_parallel(ckpt_dir, out_dir, tokenizer, max_shard_mb, layout, verify)
    model, cfg = load_mcore_model(ckpt_dir, verify=verify)
    return hf_io.save_hf(
        out_dir,
        hf.export_weights(model, cfg),
        hf_io.hf_config(cfg),
        tokenizer_dir=tokenizer or ckpt_dir,
        max_shard_bytes=int(max_shard_mb * 1024**2),
    )


def _training_tokenizer(ckpt_dir: str | Path) -> Path | None:
    """The tokenizer a training checkpoint's job used (its saved config), when it holds none itself."""
    from r1_megatron.checkpoint.dist import CONFIG_FILE, is_training_checkpoint
    from r1_megatron.config.loader import config_from_resolved
    from r1_megatron.data.tokenizer import has_tokenizer_files, tokenizer_dir

    if has_tokenizer_files(ckpt_dir) or not is_training_checkpoint(ckpt_dir):
        return None
    return tokenizer_dir(config_from_resolved(Path(ckpt_dir) / CONFIG_FILE))


def _mcore_to_hf_parallel(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None,
    max_shard_mb: float,
    layout: tuple[int, int, int],
    verify: str,
) -> Path:
    import torch.distributed as dist

    from r1_megatron.rollout.weight_export import export_weights
    from r1_megatron.train.forward import ForwardModel

    if not mcore_io.is_mcore_dir(ckpt_dir):
        raise hf.ConversionError(
            f"{ckpt_dir}: --tp/--pp/--ep need a megatron checkpoint ({mcore_io.CARD_FILE})"
        )
    tp, pp, ep = layout
    try:
        trainer = ForwardModel.open(ckpt_dir, tp=tp, pp=pp, ep=ep, verify=verify).trainer
    except CheckpointError as e:
        raise hf.ConversionError(str(e)) from e
    cfg = trainer.cfg.model
    stream = export_weights(trainer.unwrapped, cfg, bucket_bytes=64 * 1024**2, dst=0)
    out = Path(out_dir)
    if dist.get_rank() == 0:
        hf_io.save_hf(out, stream, hf_io.hf_config(cfg), tokenizer_dir=tokenizer or ckpt_dir,
                      max_shard_bytes=int(max_shard_mb * 1024**2))
    else:
        for _ in stream:  # every rank takes part in each bucket's collective
            pass
    dist.barrier()
    return out

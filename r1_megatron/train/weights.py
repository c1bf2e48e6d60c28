"""A trainer's weights in and out: the initial weights of a new run or stage, and the HF export."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from r1_megatron.checkpoint import dist as dist_ckpt
from r1_megatron.train.checkpointing import refuse_nonfinite
from r1_megatron.train.metrics import is_rank0
from r1_megatron.train.trainer import Trainer


def load_initial_weights(trainer: Trainer, source: str) -> None:
    """Weights only, into a fresh trainer: from our checkpoint (root or step dir, any layout) or an HF
    directory (world size 1). The run starts at step 0 with its own optimizer and LR schedule
    ("": keep the random init)."""
    if not source:
        return
    path = Path(source)
    if (path / "config.json").is_file() and not (path / "metadata.json").is_file():
        if dist.get_world_size() > 1:
            raise ValueError(f"checkpoint.load: an HF directory ({path}) loads at world size 1 only; "
                             "convert it with `r1m convert hf-to-mcore` for multi-rank runs")
        from r1_megatron.checkpoint import hf, hf_io

        ckpt = hf_io.HFCheckpoint(path, verify=trainer.cfg.checkpoint.verify)
        hf.import_weights(trainer.unwrapped, ckpt, trainer.cfg.model, ckpt.keys())
        return
    if not (path / "metadata.json").is_file():
        path = dist_ckpt.latest(path) or path
    dist_ckpt.load_model_weights(trainer.unwrapped, path, trainer.cfg.checkpoint.verify)


def export_hf(trainer: Trainer, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path | None:
    """Write the trainer's weights as an HF directory (collective; rank 0 writes), with the tokenizer
    files of `tokenizer_dir` (default: the job's tokenizer, data/tokenizer.py `tokenizer_dir`).
    Weights holding a NaN/Inf are refused before anything is written, as a checkpoint save refuses them."""
    from r1_megatron.checkpoint import hf_io
    from r1_megatron.data.tokenizer import tokenizer_dir as job_tokenizer_dir
    from r1_megatron.rollout.weight_export import export_weights

    refuse_nonfinite(trainer, Path(out_dir), "export")
    stream = export_weights(trainer.unwrapped, trainer.cfg.model, dst=0)
    if is_rank0():
        return hf_io.save_hf(out_dir, stream, hf_io.hf_config(trainer.cfg.model),
                             tokenizer_dir=tokenizer_dir or job_tokenizer_dir(trainer.cfg))
    for _ in stream:
        pass
    return None

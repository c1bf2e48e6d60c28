"""Worker of test_integrity_resume.py: `python tests/dist/_integrity_worker.py OUT_DIR` on 2 ranks (dp2).

Saves steps 1-3 of micro_moe, then damages them one after another and resumes after each damage
(every rank resumes; rank 1's shard is damaged too, so the ranks must agree):
  flip      one bit in step 3's rank-1 shard                 -> resumes step 2
  size      the same, with checkpoint.verify=size            -> resumes step 3 (no checksums)
  truncate  step 2's rank-0 shard cut short as well          -> resumes step 1
  deleted   step 3's directory removed (`latest` dangles)    -> resumes step 1
  none      step 1's rank-1 shard truncated too              -> CorruptCheckpoint (one line)
then saves step 4 with checkpoint.verify=size (a manifest of sizes only).
Results go to OUT_DIR/integrity.pt (rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist._scenarios import build, job_config, save_rank0, sft_step, start  # noqa: E402


def _on_rank0(fn) -> None:
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


def main(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt
    from r1_megatron.checkpoint.integrity import MANIFEST, CorruptCheckpoint

    cfg = job_config()
    start(cfg)
    trainer = build(cfg, 2)
    root = out / "ckpt"
    sft_step(trainer, seed=20)  # the optimizer state exists from the first step on
    for step in (1, 2, 3):
        trainer.step = step
        ckpt.save(trainer, root, extra={"data_position": step})
    full, size = trainer.cfg, dataclasses.replace(
        trainer.cfg, checkpoint=dataclasses.replace(trainer.cfg.checkpoint, verify="size"))

    def resume(job) -> int:
        trainer.cfg, trainer.step = job, -1
        extra = ckpt.resume(trainer, root)
        assert trainer.step == extra["data_position"]
        return trainer.step

    results = {}
    _on_rank0(lambda: _flip(root / "step_000003" / "__1_0.distcp"))
    results["flip"] = resume(full)
    results["size"] = resume(size)
    _on_rank0(lambda: _truncate(root / "step_000002" / "__0_0.distcp"))
    results["truncate"] = resume(full)
    _on_rank0(lambda: shutil.rmtree(root / "step_000003"))
    results["deleted"] = resume(full)
    _on_rank0(lambda: _truncate(root / "step_000001" / "__1_0.distcp"))
    try:
        resume(full)
    except CorruptCheckpoint as e:
        results["none"] = str(e)
    results["latest"] = (root / "latest").read_text().strip()
    trainer.cfg, trainer.step = size, 4  # a save under checkpoint.verify=size records sizes only
    saved = ckpt.save(trainer, root, extra={"data_position": 4})
    results["size_manifest"] = json.loads((saved / MANIFEST).read_text())["files"]
    save_rank0(results, out / "integrity.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    main(out_dir)

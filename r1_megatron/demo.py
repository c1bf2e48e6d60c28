"""`r1m demo`: watch a tiny DeepSeek-V3-style MoE learn arithmetic through GRPO on a CPU.

1. A short SFT from random init on `tiny_moe` (megatron trainer) makes a weak base for 2-digit
   additions worked column by column: in data.sft_wrong_fraction of the answers that carry into the
   last column, the worked solution forgets that carry. The base is competent at the working but has
   learned the habit, so it is clearly above zero and clearly below the ceiling.
2. GRPO (rl/loop.py) with accuracy + format rewards: vLLM-CPU rollout, refit with canary, offload,
   reward pool, reference KL.
3. Held-out pass@1 (4 samples, T=0.6) before and after; curve.png, summary.json and an HF export.

Runs the same under torchrun at any layout (`torchrun --nproc-per-node 4 -m r1_megatron.cli demo
parallel.tp=2 parallel.ep=2`): every rank is a colocated vLLM rank; rank 0 prints and writes the files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def sft_base(cfg, out: Path, steps: int) -> Path:
    """Train the weak base from random init (resumable); returns its checkpoint root."""
    from r1_megatron.train.metrics import is_rank0
    from r1_megatron.train.sft import load_pairs, train_sft

    job = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, dir=str(out / "sft_checkpoints")))

    def log(step: int, metrics: dict) -> None:
        if is_rank0() and (step % 25 == 1 or step == steps):
            print(f"sft step {step}/{steps} loss {metrics['loss']:.4f}", flush=True)

    _, result = train_sft(job, load_pairs(cfg), steps, cfg.data.sft_pairs_per_step, log=log)
    return result.checkpoint

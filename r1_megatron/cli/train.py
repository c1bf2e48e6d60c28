"""`r1m sft`: SFT from a job config under torchrun (any layout) or as one process.

  r1m sft CONFIG [key=value ...]
  torchrun --nproc-per-node 4 -m r1_megatron.cli sft configs/micro_moe_sft.yaml parallel.tp=2 parallel.pp=2

`r1m train CONFIG [key=value ...]` runs GRPO (rl/loop.py) the same way.

The layout is checked against the world size before any process group starts, so a bad layout gives
the same one-line error on every rank and every rank exits non-zero (no collective is left waiting).
"""

from __future__ import annotations

import sys
from pathlib import Path

from r1_megatron.config.loader import ConfigError


def _split_args(argv: list[str], prog: str) -> tuple[str, list[str]] | None:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} CONFIG [key=value ...]\n\n{__doc__.strip().splitlines()[0]}")
        return None
    return argv[0], argv[1:]


def sft_main(argv: list[str]) -> int:
    """`r1m sft CONFIG [key=value ...]`: SFT (train/sft.py run_sft) from a job config."""
    import os

    args = _split_args(list(argv), "r1m sft")
    if args is None:
        return 0
    path, overrides = args
    try:
        from r1_megatron.config.loader import load_config
        from r1_megatron.parallel.groups import resolve_layout

        cfg = load_config(path, overrides)
        resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # fails here, before any collective
        from r1_megatron.parallel.groups import destroy_process_groups
        from r1_megatron.train.sft import run_sft

        run_sft(cfg)  # starts the process groups (train/sft.py train_sft)
        destroy_process_groups()
    except (ConfigError, FileNotFoundError) as e:
        print(f"r1m sft: {e}", file=sys.stderr)
        return 2
    return 0



def main(argv: list[str] | None = None) -> int:
    """`r1m train CONFIG [key=value ...]` (also under torchrun, any layout)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: r1m train CONFIG [key=value ...]\n\nGRPO from a job config (rl/loop.py); resumes from "
              "the run's latest checkpoint.")
        return 0
    if not argv or argv[0].startswith("-"):
        print("usage: r1m train CONFIG [key=value ...]", file=sys.stderr)
        return 2
    from r1_megatron.config import load_config, save_resolved
    from r1_megatron.rl.loop import train

    cfg = load_config(argv[0], argv[1:])
    save_resolved(cfg, Path(cfg.logging.run_dir))
    train(cfg)
    return 0

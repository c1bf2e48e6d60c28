"""`r1m convert`: HF <-> megatron checkpoints, on one process or under torchrun.

  r1m convert hf-to-mcore --hf DIR --out DIR [--card NAME] [--tp N --pp N --ep N] [--verify MODE]
  r1m convert mcore-to-hf --ckpt DIR --out DIR [--tokenizer DIR] [--max-shard-mb N] [--tp N --pp N --ep N]

The conversion itself is train/convert_job.py.
"""

from __future__ import annotations

import argparse
import sys

from r1_megatron.checkpoint import hf, integrity
from r1_megatron.train.convert_job import hf_to_mcore, mcore_to_hf
from r1_megatron.checkpoint.integrity import CheckpointError
from r1_megatron.config.loader import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1m convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--card", default=None, help="model card for the fields HF does not store")
    for flag in ("--tp", "--pp", "--ep"):
        a.add_argument(flag, type=int, default=1, help=f"megatron {flag[2:]} size of the split (torchrun)")
    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF directory")
    b.add_argument("--ckpt", required=True, help="megatron checkpoint directory written by r1m")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--tokenizer", default=None, help="directory with tokenizer files (default: --ckpt)")
    b.add_argument("--max-shard-mb", type=float, default=2048, help="safetensors shard size (MiB)")
    for flag in ("--tp", "--pp", "--ep"):
        b.add_argument(flag, type=int, default=1, help=f"megatron {flag[2:]} size for the load (torchrun)")
    for p in (a, b):
        p.add_argument("--verify", choices=integrity.VERIFY_MODES, default="full",
                       help="check the input files against their manifest: full (checksums), size, off")
    args = parser.parse_args(argv)
    try:
        layout = (args.tp, args.pp, args.ep)
        if args.direction == "hf-to-mcore":
            out = hf_to_mcore(args.hf, args.out, args.card, layout, args.verify)
        else:
            out = mcore_to_hf(args.ckpt, args.out, args.tokenizer, args.max_shard_mb, layout, args.verify)
    except (hf.ConversionError, ConfigError, CheckpointError) as e:
        print(f"r1m convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0

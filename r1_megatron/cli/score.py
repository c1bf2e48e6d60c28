"""`r1m score`: per-token log-probs of token ids under a checkpoint (megatron or HF directory).

  r1m score --ckpt DIR --input IN.jsonl --output OUT.jsonl [--tp N --pp N --ep N]

The scoring itself is train/score_job.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from r1_megatron.checkpoint.hf import ConversionError
from r1_megatron.checkpoint.integrity import VERIFY_MODES, CheckpointError
from r1_megatron.train.score_job import ScoreInputError, score_file, score_file_parallel
from r1_megatron.config.loader import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1m score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="megatron checkpoint (r1m) or HF directory")
    parser.add_argument("--input", required=True, help='JSONL, one {"tokens": [...]} per line')
    parser.add_argument("--output", required=True, help="JSONL with 'logprobs' added")
    for flag in ("--tp", "--pp", "--ep"):
        parser.add_argument(flag, type=int, default=1, help=f"megatron {flag[2:]} size (under torchrun)")
    parser.add_argument("--verify", choices=VERIFY_MODES, default="full",
                        help="check the files against their manifest: full (checksums), size, off")
    args = parser.parse_args(argv)
    layout = (args.tp, args.pp, args.ep)
    try:
        if layout != (1, 1, 1) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            n = score_file_parallel(args.ckpt, args.input, args.output, layout, args.verify)
        else:
            n = score_file(args.ckpt, args.input, args.output, args.verify)
    except (ScoreInputError, ConversionError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"r1m score: {e}", file=sys.stderr)
        return 1
    print(f"scored {n} sequences -> {args.output}")
    return 0

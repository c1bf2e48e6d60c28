"""`r1m pipeline CONFIG [--out DIR] [key=value ...]`: the R1 recipe as a list of stages (pipeline/run.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from r1_megatron.config.loader import ConfigError
from r1_megatron.pipeline.run import run
from r1_megatron.pipeline.spec import load_pipeline
from r1_megatron.train.metrics import is_rank0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: r1m pipeline CONFIG [--out DIR] [key=value ...] [stages.<name>.<field>=value ...]")
        return 0 if argv else 2
    config, rest, out = argv[0], argv[1:], None
    if "--out" in rest:
        i = rest.index("--out")
        if i + 1 >= len(rest):
            print("r1m pipeline: --out needs a directory", file=sys.stderr)
            return 2
        out, rest = Path(rest[i + 1]), rest[:i] + rest[i + 2 :]
    out = out or Path("runs") / Path(config).stem
    try:
        report = run(load_pipeline(config, rest), out)
    except ConfigError as e:
        print(f"r1m pipeline: {e}", file=sys.stderr)
        return 2
    if not is_rank0():
        return 0
    measured = [r for r in report["stages"] if r.get("pass_at_1") is not None]
    summary = ", ".join(f"{r['name']} {r['pass_at_1']:.3f}" for r in measured)
    print(f"[pipeline] done in {report['seconds']:.0f} s; pass@1: {summary or '-'}; teacher "
          f"{report['teacher_pass_at_1']}, student {report['student_pass_at_1']}; "
          f"report {out / 'report.json'}")
    return 0

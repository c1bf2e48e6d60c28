"""`r1m doctor [--json] [--require-gpu | --require-stack]`: which pieces of the GPU path this environment has.

The probes and the pin checks are plan/doctor.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict

from r1_megatron.plan.doctor import _summary, collect, preflight


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="r1m doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--require-gpu",
        action="store_true",
        help="exit 1 unless the pinned GPU stack and a CUDA device are here",
    )
    mode.add_argument(
        "--require-stack",
        action="store_true",
        help="exit 1 unless the pinned GPU stack is installed (no device)",
    )
    args = ap.parse_args(argv)
    comps, flags = collect()
    summary = _summary(comps, flags)
    failures = preflight(devices=args.require_gpu) if args.require_gpu or args.require_stack else []
    if args.json:
        report = {"components": [asdict(c) for c in comps], **flags, "summary": summary, "failures": failures}
        print(json.dumps(report, indent=2))
    else:
        print(f"python {platform.python_version()} on {platform.platform()}")
        for c in comps:
            print(f"  {c.name:<19} {c.version or '-':<24} {c.status:<9} {c.effect}")
        print(summary)
    for line in failures:
        print(f"r1m doctor: FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0

"""`r1m plan CONFIG [key=value ...] [--world-size N] [--json]`: memory and refit plan of a job config.

Exit codes: 0 fits, 1 does not fit (the reasons are printed with their numbers), 2 bad config or layout.
"""

from __future__ import annotations

import argparse
import json
import sys

from r1_megatron.config.loader import ConfigError, load_config
from r1_megatron.plan.report import format_text, plan_job, to_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="r1m plan", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="job config (path or configs/<name>)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ap.add_argument("--world-size", type=int, default=None, help="GPUs in all (default: tp*pp*parallel.dp)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_intermixed_args(argv)
    try:
        pl = plan_job(load_config(args.config, args.overrides), args.world_size)
    except ConfigError as e:
        print(f"r1m plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(pl), indent=2) if args.json else format_text(pl))
    return 0 if pl.fits else 1

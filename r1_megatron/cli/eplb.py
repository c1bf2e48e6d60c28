"""`r1m eplb plan`: redundant-expert placement from measured loads (docs/architecture.md#redundant-experts).

    r1m eplb plan --load LOAD.json --slots R --gpus G --nodes N --groups K --out PLAN.json

LOAD.json is {"load": [[E floats] x L]}. PLAN.json holds phy2log, log2phy, logcnt and the per-layer
max/mean GPU load before (no redundancy: E experts contiguous over the GPUs) and after. Bad input
is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from r1_megatron.moe import eplb


def _read_load(path: str) -> np.ndarray:
    """The [L, E] load matrix of a JSON file, or ValueError naming the bad entry."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--load: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--load: cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--load: {path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or "load" not in doc:
        raise ValueError(f'--load: {path} must be a JSON object with a "load" key')
    rows = doc["load"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise ValueError("load must be a non-empty list of non-empty rows (one per MoE layer)")
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(f"load[{i}] has {len(row)} experts, load[0] has {len(rows[0])}")
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, int | float):
                raise ValueError(f"load[{i}][{j}] = {x!r} is not a number")
            if not math.isfinite(x):
                raise ValueError(f"load[{i}][{j}] = {x} is not finite")
            if x < 0:
                raise ValueError(f"load[{i}][{j}] = {x} is negative")
    return np.asarray(rows, dtype=np.float64)


def plan(load: np.ndarray, slots: int, gpus: int, nodes: int, groups: int) -> dict:
    """The placement and its before/after balance as a JSON-ready dict."""
    placement = eplb.rebalance_experts(load, slots, groups, nodes, gpus)
    before = eplb.max_mean(eplb.baseline_gpu_loads(load, gpus))
    after = eplb.max_mean(eplb.gpu_loads(load, placement))
    return {
        "policy": "hierarchical" if groups % nodes == 0 else "global",
        "slots": slots,
        "gpus": gpus,
        "nodes": nodes,
        "groups": groups,
        **placement.as_dict(),
        "max_mean_before": before.tolist(),
        "max_mean_after": after.tolist(),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1m eplb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("plan", help="place R physical expert slots on G GPUs from measured loads")
    p.add_argument("--load", required=True, help='JSON file {"load": [[E floats] x L]}')
    p.add_argument("--slots", type=int, required=True, help="R, physical expert slots (>= E, divisible by G)")
    p.add_argument("--gpus", type=int, required=True, help="G, EP ranks")
    p.add_argument("--nodes", type=int, default=1, help="n, nodes (G divisible by n)")
    p.add_argument("--groups", type=int, default=1, help="K, expert groups (E divisible by K)")
    p.add_argument("--out", required=True, help="where to write the plan JSON")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        load = _read_load(args.load)
        result = plan(load, args.slots, args.gpus, args.nodes, args.groups)
    except ValueError as err:
        print(f"r1m eplb: error: {err}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(result) + "\n")
    before, after = result["max_mean_before"], result["max_mean_after"]
    print(
        f"{result['policy']} placement of {args.slots} slots on {args.gpus} GPUs, {len(after)} layers: "
        f"max/mean load {sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f} (mean over layers)"
    )
    return 0

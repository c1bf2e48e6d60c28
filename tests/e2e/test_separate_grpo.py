"""GRPO with separate rollout engines (rollout.placement: separate), through our real loop at trainer
world size 1, each run in a process of its own (tests/e2e/_separate_run.py):

- one step with two engine processes equals the step with the in-process engine: the same samples,
  the same rewards, loss and grad norm within 1e-5 (sampling depends on the prompt, not the engine);
- rollout.async=one_step: the batch trained at step 1 comes from the step-0 weights (staleness 0),
  every later batch from the weights one step older than the trainer's (staleness exactly 1 for
  every sample), and the first batch equals the on-policy run's;
- killing an engine process mid-rollout when it cannot be restarted ends the run with a RolloutError
  naming the engine, well within rollout.timeout_s, and the last checkpoint loads, holding the
  trainer's weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
# test_grpo_learns' shape: from the random init some of the 32 samples hold digits, so rewards differ.
BASE = ["logging.tensorboard=false", "logging.progress=false", "rl.prompts_per_step=4", "rl.group_size=8",
        "rl.kl_coef=0.0", "rl.eval_every=0", "rollout.max_new_tokens=16", "data.seq_length=256", "optim.lr=3e-3",
        "rl.tis=2.0", "rollout.timeout_s=900"]


def _run(tmp_path: Path, name: str, mode: str, *overrides: str) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(REPO / "tests" / "e2e" / "_separate_run.py"), str(out), mode,
           f"logging.run_dir={tmp_path / name}", *BASE, *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _tokens(batch: list[dict]) -> list:
    return [(s["group"], s["index"], s["response"], s["reward"]) for s in batch]


@pytest.mark.timeout(3200)
def test_separate_engines_give_the_in_process_step(tmp_path):
    local = _run(tmp_path, "local", "plain", "rl.steps=1")
    sep = _run(tmp_path, "sep", "plain", "rl.steps=1", "rollout.placement=separate", "rollout.engines=2")
    assert _tokens(sep["steps"][0]) == _tokens(local["steps"][0])
    assert len({s["reward"] for s in sep["steps"][0]}) > 1  # rewards differ, so advantages and loss are not 0
    (a,), (b,) = local["metrics"], sep["metrics"]
    assert a["grad_norm"] > 0.1  # (the on-policy loss itself is ~0: the advantages have mean 0)
    for key in ("loss", "pg_loss", "grad_norm", "reward/mean", "mismatch_abs"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert b["refit/canary_max_err"] <= 1e-3


@pytest.mark.timeout(3200)
def test_one_step_off_trains_on_samples_one_version_stale(tmp_path):
    sync = _run(tmp_path, "sync", "plain", "rl.steps=1", "rollout.placement=separate")
    run = _run(tmp_path, "async", "plain", "rl.steps=3", "rollout.placement=separate", "rollout.async=one_step")
    assert [sorted({s["version"] for s in b}) for b in run["steps"]] == [[0], [0], [1]]
    rows = run["metrics"]
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["async/staleness_min"] for r in rows] == [0.0, 1.0, 1.0]
    assert _tokens(run["steps"][0]) == _tokens(sync["steps"][0])  # step 0 is on policy
    assert all(r["tis_weight"] > 0 for r in rows)


@pytest.mark.timeout(2400)
def test_engine_killed_mid_rollout_fails_the_step_and_keeps_the_checkpoint(tmp_path):
    run = _run(tmp_path, "kill", "kill", "rl.steps=2", "checkpoint.save_every=1", "rollout.placement=separate",
               "rollout.engines=2")
    assert run["error"] and "rollout engine 0" in run["error"] and "could not start" in run["error"], run["error"]
    assert len(run["metrics"]) == 1  # step 1 finished and was logged; step 2 failed in its rollout
    assert run["checkpoint_equal"] is True

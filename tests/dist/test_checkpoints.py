"""Distributed checkpoints on 2 ranks at (tp2, ep2): crash safety, bit-exact resume, resharding.

One job trains a step, saves (step 1), trains another and is SIGKILLed (every rank, by the test's own
hook) inside the next save, after its shards are written and before the commit. Then:
- `latest` still names step 1; a second job resumes from it into a differently seeded model and
  gets the logprobs the first job had at step 1, bit for bit, with the data position it saved;
- resume is bit-exact: that job trains to step 4, saves, trains 2 more steps; a fresh trainer
  (another init) resumed from the save reproduces those 2 losses exactly (model, optimizer, RNG,
  step, data position restored); the save holds the resolved config and the model card;
- resharding: the step-4 (tp2, ep2) checkpoint loaded at (tp1, ep1, dp2) and at (pp2) gives the
  same logprobs (fp32, 1e-5), with step and data position; the optimizer state is carried over
  (resharded) and the per-rank RNG state is not (reseeded at another layout).
"""

import pytest
import torch
import yaml

from tests.dist._launch import check_ok, launch


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    crashed = launch(["tests/dist/_scenarios.py", "crash", str(out)], 2, out / "logs_crash", timeout=300)
    ckpt = out / "ckpt"
    state = {
        "crash_codes": [r.returncode for r in crashed],
        "latest_after_crash": (ckpt / "latest").read_text().strip(),
        "tmp_after_crash": sorted(p.name for p in ckpt.glob(".tmp-*")),
    }
    check_ok(launch(["tests/dist/_scenarios.py", "recover", str(out)], 2, out / "logs_recover", timeout=420))
    state.update(torch.load(out / "recover.pt", weights_only=False))
    state["before_crash"] = torch.load(out / "before_crash.pt", weights_only=False)
    state["dir"] = ckpt
    return state


@pytest.mark.timeout(720)
def test_crash_mid_save_keeps_previous_checkpoint(recovered):
    assert recovered["crash_codes"] == [-9, -9]  # both ranks died by SIGKILL inside save()
    assert recovered["latest_after_crash"] == "step_000001"
    assert recovered["tmp_after_crash"] == [".tmp-step_000002"]  # written, never committed
    crash = recovered["crash"]
    assert crash["step"] == 1 and crash["extra"]["data_position"] == 1
    assert torch.equal(crash["logprobs"], recovered["before_crash"]["logprobs"])
    # The next save cleaned the leftover and committed.
    assert not list(recovered["dir"].glob(".tmp-*"))
    assert sorted(p.name for p in recovered["dir"].glob("step_*")) == ["step_000001", "step_000004"]


def test_resume_is_bit_exact(recovered):
    r = recovered["resume"]
    assert r["saved"] == r["latest"] == "step_000004"
    assert r["extra"]["data_position"] == 4
    assert r["extra"]["_optimizer_restored"] and r["extra"]["_rng_restored"]
    assert r["resumed"] == r["after"]  # exact float equality
    assert r["step"] == 6
    saved = recovered["dir"] / "step_000004"
    config = yaml.safe_load((saved / "config.yaml").read_text())
    assert config["parallel"]["tp"] == 2 and config["parallel"]["ep"] == 2
    assert yaml.safe_load((saved / "model_card.yaml").read_text())["num_experts"] == 8


def test_reshard_on_load(recovered):
    r = recovered["reshard"]
    for name in ("tp1_ep1", "pp2"):
        got = r[name]
        err = (got["logprobs"] - r["tp2_ep2"]).abs().max().item()
        assert err <= 1e-5, (name, err)
        assert got["step"] == 4 and got["extra"]["data_position"] == 4
        assert got["extra"]["_optimizer_restored"] and not got["extra"]["_rng_restored"]

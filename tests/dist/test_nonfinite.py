"""The non-finite guard at (tp2, pp2) on 4 gloo ranks, micro_moe (issue 20, item 1).

One job (tests/dist/_nonfinite_scenarios.py) puts a NaN into one element of one parameter's gradient
on rank 3 only. Guarantees:
- the step is skipped on every rank (update_ok 0, train/skipped_steps 1) and the weights, the
  optimizer's fp32 params, the Adam state (moments and step counts), the aux-loss-free expert bias,
  the LR schedule and the trainer's step count are bit-identical to before;
- the next step trains normally (update, finite weights);
- three NaN steps in a row stop the run on every rank with one line naming the step;
- a save with a NaN weight on one rank is refused on every rank and `latest` still names the
  previous checkpoint;
- negative control: the same NaN with optim.skip_nonfinite=false reaches the weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist._launch import check_ok, launch

WORLD = 4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("nonfinite")
    check_ok(launch(["tests/dist/_nonfinite_scenarios.py", str(out)], WORLD, out / "logs", timeout=600))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.timeout(900)
def test_nan_gradient_on_one_rank_is_skipped_everywhere(ranks):
    assert any(res["has_bias"] for res in ranks)  # the MoE stage's routers hold an expert bias
    for r, res in enumerate(ranks):
        assert res["first"]["update_ok"] == 1.0, r
        step = res["nan_step"]
        assert step["update_ok"] == 0.0 and step["train/skipped_steps"] == 1.0, (r, step)
        assert step["grad_norm"] != step["grad_norm"], (r, step)  # the global norm is NaN on every rank
        assert all(res["untouched"].values()), (r, res["untouched"])


def test_next_step_trains_normally(ranks):
    for r, res in enumerate(ranks):
        step = res["next_step"]
        assert step["update_ok"] == 1.0 and step["train/skipped_steps"] == 1.0, (r, step)
        assert torch.isfinite(torch.tensor(step["loss"])) and res["next_moved"] and res["next_finite"], r
        # A step that updates moves the expert bias, so "untouched" above was a real restore.
        assert res["next_bias_moved"] == res["has_bias"], r


def test_three_in_a_row_stop_the_run(ranks):
    for r, res in enumerate(ranks):
        assert res["streak"] == [0.0, 0.0], (r, res["streak"])
        msg = res["stop_error"]
        assert msg is not None and "\n" not in msg, (r, msg)
        # Steps taken: 2 (the skipped ones do not count), so the third bad attempt is step 3.
        assert msg.startswith("train: 3 consecutive steps skipped (optim.max_bad_steps=3), the last at step 3: ")
        assert "non-finite gradient" in msg and "on rank 3" in msg and "decoder.layers" in msg, msg


def test_save_with_nan_weight_is_refused(ranks):
    for r, res in enumerate(ranks):
        msg = res["save_error"]
        assert msg is not None and "refusing to save non-finite weights" in msg and "on rank 3" in msg, (r, msg)
        assert msg.endswith("still names step_000001"), msg
        assert res["latest_after_refusal"] == "step_000001", r


def test_negative_control_nan_reaches_the_weights(ranks):
    for r, res in enumerate(ranks):
        assert res["unguarded_step"]["update_ok"] == 1.0, r
        rank, name = res["unguarded_nonfinite_weight"]
        assert rank == 3 and "decoder.layers" in name, (r, rank, name)

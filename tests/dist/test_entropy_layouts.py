"""Policy entropy through the trainer at (tp2), (pp2), (tp2, pp2), and the GRPO loss with
rl.entropy_coef > 0 split over TP, PP and DP, on micro_moe in fp32 over gloo.

Every layout loads the single-rank run's initial checkpoint and takes one GRPO step on the same rollout
batch (tests/dist/_entropy_scenarios.py). The per-token entropy the loss receives (vocab-parallel,
train/entropy.py) equals a full-softmax reference (torch.log_softmax over the whole vocabulary of the
world-1 logits) within 1e-5, at world 1 and at every dp-1 layout; the loss, its entropy term, the logged
entropy and the grad norm equal the single-rank ones within 1e-5 at every layout, (ep2, dp2) included.
"""

import pytest
import torch

from tests.dist._launch import check_ok, launch

TOL = 1e-5
WORLD2 = ["2,1,1,2,1,allgather", "1,2,1,1,1,allgather", "1,1,2,1,2,alltoall"]
WORLD4 = ["2,2,1,2,1,allgather"]
SCRIPT = "tests/dist/_entropy_scenarios.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("entropy_reference")
    check_ok(launch([SCRIPT, "reference", str(out)], 1, out / "logs", timeout=240))
    return torch.load(out / "reference.pt", weights_only=False)


def _layouts(reference: dict, specs: list[str], world: int, out) -> dict:
    argv = [SCRIPT, "layouts", str(out), reference["init"], *specs]
    check_ok(launch(argv, world, out / "logs", timeout=420))
    return torch.load(out / "layouts.pt", weights_only=False)


def _check_entropy(name: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) > 1, (name, len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (name, i, g.shape, w.shape)
        err = (g.double() - w).abs().max().item()
        assert err <= TOL, (name, i, err)


def _check_metrics(name: str, got: dict, ref: dict) -> None:
    for key in ("loss", "pg_loss", "entropy_loss", "entropy", "grad_norm", "num_tokens"):
        assert abs(got[key] - ref[key]) <= TOL, (name, key, got[key], ref[key])


def test_world1_entropy_equals_full_softmax(reference):
    _check_entropy("world1", reference["entropy"], reference["full_softmax"])
    m = reference["metrics"]
    assert m["entropy_loss"] < 0
    assert m["entropy"] > 3.0 and m["update_ok"] == 1.0


@pytest.mark.timeout(480)
def test_world2_layouts(reference, tmp_path_factory):
    results = _layouts(reference, WORLD2, 2, tmp_path_factory.mktemp("entropy_world2"))
    assert sorted(results) == sorted(WORLD2)
    for name in WORLD2:
        _check_metrics(name, results[name]["metrics"], reference["metrics"])
        if results[name]["entropy"] is not None:
            _check_entropy(name, results[name]["entropy"], reference["full_softmax"])
    assert sum(results[n]["entropy"] is not None for n in WORLD2) == 2  # tp2 and pp2


@pytest.mark.timeout(480)
def test_world4_tp2_pp2(reference, tmp_path_factory):
    results = _layouts(reference, WORLD4, 4, tmp_path_factory.mktemp("entropy_world4"))
    (name,) = WORLD4
    _check_metrics(name, results[name]["metrics"], reference["metrics"])
    _check_entropy(name, results[name]["entropy"], reference["full_softmax"])

"""The refit transport (rollout/weight_export.py) at world 4 against world 1, on micro_moe in fp32.

One world-1 run saves micro_moe (norms and router biases made distinct, so a swap would show) and its
refit stream; a 4-rank run loads the checkpoint at (tp2, dp2), (pp2, ep2, dp2) and (tp2, pp2) and
streams it with every rank receiving (GPU refit) and with rank 0 alone receiving (CPU refit, export).
Guarantees, per layout:
- every rank's stream equals world 1's bit for bit: same names, order, dtypes, shapes and bits (and
  rank 0's dst=0 stream too; the other ranks get nothing with dst=0);
- no rank receives more bytes than the weights hold: at most one broadcast of the model, where the
  earlier zero-filled all-reduce over the world delivered about twice that; no all-reduce is made,
  and some bytes really travel (a rank that holds a part only cannot skip the transport);
- the second stream reuses the first one's send/receive scratch buffers (same addresses and sizes).
The same guarantees over NCCL, one GPU per rank in the GPU's training dtype (bf16), at world 2
((tp2) and (ep2, dp2)) against world 1 on one GPU: gpu-marked, and it needs 2 GPUs (skipped on one).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist._launch import check_ok, launch

LAYOUTS = ["2,1,1,2,2", "1,2,2,1,2", "2,2,1,2,1"]  # tp,pp,ep,etp,dp at world 4
GPU_LAYOUTS = ["2,1,1,2,1", "1,1,2,1,2"]  # at world 2
WORKER = "tests/dist/_transport_scenarios.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("transport")
    check_ok(launch([WORKER, "single", str(out)], 1, out / "logs1", timeout=240))
    check_ok(launch([WORKER, "layouts", str(out), *LAYOUTS], 4, out / "logs4", timeout=420))
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


def _bit_exact(ranks: list[dict], layout: str) -> None:
    for r, res in enumerate(ranks):
        assert res[layout]["diff"] == [], (layout, r, res[layout]["diff"][:5])
    assert ranks[0][layout]["diff_dst0"] == []
    assert [res[layout]["diff_dst0"] for res in ranks[1:]] == [0] * (len(ranks) - 1)


def _one_broadcast(ranks: list[dict], layout: str) -> None:
    for r, res in enumerate(ranks):
        got = res[layout]
        assert "all_reduce" not in got["calls"], (layout, r, got["calls"])
        assert 0 < got["received"] <= got["weight_bytes"], (layout, r, got["received"], got["weight_bytes"])


def _scratch_reused(ranks: list[dict], layout: str) -> None:
    for r, res in enumerate(ranks):
        first, second = res[layout]["scratch"]
        assert second == first, (layout, r, first, second)
    # every layout gathers somewhere (TP, expert-TP or EP); pp2's dense first stage may have nothing to
    assert any(res[layout]["scratch"][0] for res in ranks), layout


@pytest.mark.timeout(720)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stream_is_bit_exact_at_every_rank(ranks, layout):
    _bit_exact(ranks, layout)


@pytest.mark.timeout(720)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_receives_at_most_one_broadcast(ranks, layout):
    _one_broadcast(ranks, layout)


@pytest.mark.timeout(720)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scratch_buffers_are_reused_across_refits(ranks, layout):
    _scratch_reused(ranks, layout)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL gather needs 2 GPUs")
@pytest.mark.timeout(600)
def test_nccl_transport_on_two_gpus(tmp_path):
    env = {"TRANSPORT_DEVICE": "cuda"}
    check_ok(launch([WORKER, "single", str(tmp_path)], 1, tmp_path / "logs1", timeout=240, env=env))
    argv = [WORKER, "layouts", str(tmp_path), *GPU_LAYOUTS]
    check_ok(launch(argv, 2, tmp_path / "logs2", timeout=300, env=env))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = torch.load(tmp_path / "single.pt")["pairs"]
    assert {t.dtype for n, t in single if not n.endswith("e_score_correction_bias")} == {torch.bfloat16}
    for layout in GPU_LAYOUTS:
        _bit_exact(ranks, layout)
        _one_broadcast(ranks, layout)
        _scratch_reused(ranks, layout)

"""The refit transport (rollout/weight_export.py) at world 4 against world 1, on micro_moe in fp32.

One world-1 run saves micro_moe (norms and router biases made distinct, so a swap would show) and its
refit stream; a 4-rank run loads the checkpoint at (tp2, dp2), (pp2, ep2, dp2) and (tp2, pp2) and
streams it with every rank receiving (GPU refit) and with rank 0 alone receiving (CPU refit, export).
Guarantees, per layout:
- every rank's stream equals world 1's bit for bit: same names, order, dtypes, shapes and bits (and
  rank 0's dst=0 stream too; the other ranks get nothing with dst=0);
- no rank receives more bytes than the weights hold: at most one broadcast of the model, where the
  earlier zero-filled all-reduce over the world delivered about twice that; no all-reduce is made,
  and some bytes really travel (a rank that holds a part only cannot skip the transport).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist._launch import check_ok, launch

LAYOUTS = ["2,1,1,2,2", "1,2,2,1,2", "2,2,1,2,1"]  # tp,pp,ep,etp,dp at world 4
WORKER = "tests/dist/_transport_scenarios.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("transport")
    check_ok(launch([WORKER, "single", str(out)], 1, out / "logs1", timeout=240))
    check_ok(launch([WORKER, "layouts", str(out), *LAYOUTS], 4, out / "logs4", timeout=420))
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.timeout(720)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stream_is_bit_exact_at_every_rank(ranks, layout):
    for r, res in enumerate(ranks):
        assert res[layout]["diff"] == [], (layout, r, res[layout]["diff"][:5])
    assert ranks[0][layout]["diff_dst0"] == []
    assert [res[layout]["diff_dst0"] for res in ranks[1:]] == [0, 0, 0]


@pytest.mark.timeout(720)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_receives_at_most_one_broadcast(ranks, layout):
    for r, res in enumerate(ranks):
        got = res[layout]
        assert "all_reduce" not in got["calls"], (layout, r, got["calls"])
        assert 0 < got["received"] <= got["weight_bytes"], (layout, r, got["received"], got["weight_bytes"])

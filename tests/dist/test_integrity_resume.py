"""Resume falls back to the newest intact checkpoint when `latest` is damaged (2 ranks, dp2).

See tests/dist/_integrity_worker.py for the sequence: a bit flip in one rank's shard of the newest
checkpoint sends resume to the previous one (with `checkpoint.verify: size` it is not seen), a
truncation of that one sends it one further back, a deleted `latest` directory likewise, and when
every checkpoint is damaged resume fails with one line naming the newest damage. Each
fallback is logged loudly on every rank. A save under `checkpoint.verify: size` records sizes only.
"""

import pytest
import torch

from tests.dist._launch import check_ok, launch


@pytest.mark.timeout(600)
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    ranks = launch(["tests/dist/_integrity_worker.py", str(tmp_path)], 2, tmp_path / "logs", timeout=420)
    check_ok(ranks)
    r = torch.load(tmp_path / "integrity.pt", weights_only=False)
    assert (r["flip"], r["size"], r["truncate"], r["deleted"]) == (2, 3, 1, 1)
    shard = tmp_path / "ckpt" / "step_000003" / "__1_0.distcp"
    assert "\n" not in r["none"] and "no intact checkpoint to resume from" in r["none"]
    assert "latest names step_000003, which is not a complete checkpoint" in r["none"], r["none"]
    assert r["latest"] == "step_000003"  # resume reads; it never rewrites the pointer
    sizes = r["size_manifest"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "common.pt"} <= set(sizes)
    assert all(set(entry) == {"size"} for entry in sizes.values())
    for rank in ranks:
        assert rank.log.count("RESUMING FROM AN OLDER CHECKPOINT") == 3, rank.log[-3000:]
        assert f"checkpoint {shard.parent} is damaged, skipped: corrupt checkpoint: {shard}" in rank.log

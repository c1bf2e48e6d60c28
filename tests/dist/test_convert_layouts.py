"""`r1m convert mcore-to-hf` is layout-independent, bit for bit.

The same weights saved from world 1 and from (tp2, pp2) (the world-4 job loads the single-rank
initial checkpoint at tp2/pp2 and saves it again) are converted three ways: the single-rank
checkpoint on one process, the (tp2, pp2) checkpoint on one process (resharded on load), and the
(tp2, pp2) checkpoint under 4 ranks with --tp 2 --pp 2 --ep 2 (TP gather with per-rank gate/up
split, PP broadcast, EP gather through rollout/weight_export.py, rank 0 writing). Every safetensors
tensor must be identical, and the 4-rank run must also leave config.json and the index the same.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.dist._launch import check_ok, launch


def _convert(ckpt, out, nprocs: int = 1, layout: tuple | None = None) -> dict[str, torch.Tensor]:
    argv = ["-m", "r1_megatron.cli", "convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out)]
    if layout:
        argv += ["--tp", str(layout[0]), "--pp", str(layout[1]), "--ep", str(layout[2])]
    check_ok(launch(argv, nprocs, out.parent / f"logs_{out.name}", timeout=300))
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.timeout(600)
def test_mcore_to_hf_is_layout_independent(reference, world4, tmp_path):
    single_ckpt = reference["init"]
    split_ckpt = world4["dir"] / "ckpt_2_2_1_2_1_allgather_save" / "step_000000"
    a = _convert(single_ckpt, tmp_path / "from_single")
    b = _convert(split_ckpt, tmp_path / "from_tp2pp2")
    c = _convert(split_ckpt, tmp_path / "tp2pp2ep2_4ranks", nprocs=4, layout=(2, 2, 2))
    assert len(a) > 50 and set(a) == set(b) == set(c)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert torch.equal(a[name], c[name]), name
    assert any(k.endswith("e_score_correction_bias") for k in a) and any(".experts.7." in k for k in a)
    for meta in ("config.json", "model.safetensors.index.json"):
        assert json.loads((tmp_path / "from_single" / meta).read_text()) == json.loads(
            (tmp_path / "tp2pp2ep2_4ranks" / meta).read_text()
        )


@pytest.mark.timeout(600)
def test_hf_to_mcore_sharded_reads_only_its_shard(tmp_path):
    """4 ranks at (tp2, pp2, ep2): each reads only its stage's layers, its EP rank's experts and its TP
    slices; the checkpoint, exported back by one process, is bit-exact against the HF original."""
    import re

    from r1_megatron.checkpoint import hf_io
    from r1_megatron.config.loader import load_card
    from r1_megatron.model.random_hf import make_hf_checkpoint

    card = load_card("micro_moe")
    src = tmp_path / "hf"
    make_hf_checkpoint(card, src, seed=5)
    original = {}
    for f in src.glob("*.safetensors"):
        original.update(load_file(f))
    # sharded with an index, as published checkpoints are
    config = json.loads((src / "config.json").read_text())
    hf_io.save_hf(src.with_name("hf_index"), sorted(original.items()), config, max_shard_bytes=100_000)
    src = src.with_name("hf_index")
    argv = ["-m", "r1_megatron.cli", "convert", "hf-to-mcore", "--hf", str(src),
            "--out", str(tmp_path / "mc"), "--tp", "2", "--pp", "2", "--ep", "2"]
    ranks = launch(argv, 4, tmp_path / "logs_import", timeout=400)
    check_ok(ranks)
    back = _convert(tmp_path / "mc", tmp_path / "back")
    assert set(back) == set(original)
    for name in original:
        assert torch.equal(back[name], original[name]), name
    # megatron's rank order is tp-ep-pp here: ranks 0, 1 are stage 0 (layer 0), ranks 2, 3 stage 1
    # (layer 1 and the MTP layer 2); the EP rank is rank % 2, holding experts 4 * (rank % 2) + 0..3.
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    for r in ranks:
        m = re.search(r"rank (\d): read \d+ tensors, ([\d.]+) MiB of ([\d.]+) MiB; "
                      r"layers (\[.*?\]); experts (\[.*?\])", r.log)
        assert m, r.log[-2000:]
        rank, mib, layers, experts = int(m[1]), float(m[2]), json.loads(m[4]), json.loads(m[5])
        assert layers == ([0] if rank < 2 else [1, 2]), (rank, layers)
        assert experts == ([] if rank < 2 else [4 * (rank % 2) + e for e in range(4)]), (rank, experts)
        assert 0 < mib * 2**20 < 0.6 * total, (rank, mib, total)

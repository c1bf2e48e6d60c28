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

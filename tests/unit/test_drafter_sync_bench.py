"""bench/drafter_sync.py's frozen arm: `with_drafter` puts one checkpoint's MTP layer on another's trunk.

Guarantees, on two random micro_moe HF checkpoints (transformers' init, an MTP layer each):
- the tensors vLLM's drafter owns (rollout/speculative.py `drafter_weight_filter`) come from the
  drafter checkpoint, every other tensor (the MTP layer's copies of the shared embedding and head
  included) from the trunk checkpoint, and no name is lost or added;
- `changes` then sees the MTP layer move and nothing else;
- checkpoints whose MTP layers differ are refused.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from r1_megatron.checkpoint.hf_io import HFCheckpoint
from r1_megatron.config.loader import load_card
from r1_megatron.model.random_hf import make_hf_checkpoint

BENCH = Path(__file__).resolve().parents[2] / "bench" / "drafter_sync.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("drafter_sync", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafter_swap")
    dirs = [root / "seed0", root / "seed1"]
    for seed, d in enumerate(dirs):
        make_hf_checkpoint(load_card("micro_moe"), d, seed=seed)
    return dirs


def test_drafter_tensors_from_one_checkpoint_the_rest_from_the_other(bench, ckpts, tmp_path):
    trunk, drafter = ckpts
    out = bench.with_drafter(trunk, drafter, tmp_path / "swapped")
    a, b, c = HFCheckpoint(trunk), HFCheckpoint(drafter), HFCheckpoint(out)
    owned = bench.drafter_names(trunk)
    assert "model.layers.2.eh_proj.weight" in owned and "model.layers.2.embed_tokens.weight" not in owned
    assert set(c.keys()) == set(a.keys())
    for name in c.keys():
        source = b if name in owned else a
        assert torch.equal(c(name), source(name)), name
    assert not torch.equal(a("model.layers.2.eh_proj.weight"), b("model.layers.2.eh_proj.weight"))
    moved = bench.changes(trunk, out)
    assert moved["trunk"] == 0.0 and moved["mtp"] > 0.1


def test_different_mtp_layers_are_refused(bench, ckpts, tmp_path):
    trunk, _ = ckpts
    other = tmp_path / "two_mtp"
    make_hf_checkpoint(load_card("micro_moe", ["model.mtp_num_layers=2"]), other, seed=0)
    with pytest.raises(ValueError, match="do not have the same MTP layers"):
        bench.with_drafter(trunk, other, tmp_path / "out")

"""HF <-> megatron conversion is lossless, and bad checkpoints fail with an error naming the key.

Guarantees:
- HF -> mcore -> HF (through `r1m convert`) reproduces every tensor bit-exactly, the MTP layer included,
  writes the published config.json fields, and carries the tokenizer files along.
- mcore -> HF -> mcore reproduces every megatron tensor bit-exactly, the router's expert_bias buffer
  included; the exported directory loads with transformers' AutoModelForCausalLM and gives our logits.
- Missing, unknown and mis-shaped keys, a config.json that disagrees with the weights, an MTP copy that
  differs from the main embedding, and a model card that disagrees with config.json are one-line errors.
- The fused-weight splits work per tensor-parallel shard (what the multi-rank export relies on).
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1_megatron.checkpoint import hf, hf_io, mcore_io
from r1_megatron.train.convert_job import load_mcore_model
from r1_megatron.cli import main as r1m
from r1_megatron.config.loader import load_card
from r1_megatron.model.provider import build_model, forward_logits
from r1_megatron.model.random_hf import make_hf_checkpoint
from r1_megatron.parallel.device import single_rank_world

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
CARD = replace(load_card("micro_moe"), yarn_factor=4.0, original_max_position=64, mscale_all_dim=1.0)

# These tests run the CPU path; on a CUDA machine the gpu-marked tests cover the transformer-engine path.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU-path test; CUDA runs the gpu-marked tests"
)


@pytest.fixture(scope="module")
def world():
    return single_rank_world(0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, world):
    out = tmp_path_factory.mktemp("hf")
    make_hf_checkpoint(CARD, out, seed=3)
    hf_io.copy_tokenizer(TOKENIZER, out)
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_hf_to_mcore_to_hf_is_bit_exact(hf_dir, tmp_path, capsys):
    assert r1m(["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "mc")]) == 0
    assert r1m(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "hf")]) == 0
    before, after = _tensors(hf_dir), _tensors(tmp_path / "hf")
    assert sorted(before) == sorted(after)
    assert any(".layers.2.eh_proj" in k for k in after)  # the MTP layer (num_layers = 2) survived
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    routing = (config["topk_method"], config["scoring_func"], config["num_nextn_predict_layers"])
    assert routing == ("noaux_tc", "sigmoid", 1)
    assert config["rope_scaling"]["type"] == "yarn" and config["rope_scaling"]["factor"] == 4.0
    index = json.loads((tmp_path / "hf" / hf_io.INDEX).read_text())
    assert set(index["weight_map"]) == set(after)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (TOKENIZER / name).read_bytes()


def _random_megatron_model(cfg):
    torch.manual_seed(5)
    model = build_model(cfg)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.rsplit(".", 2)[-2].endswith("norm"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            if name.endswith("expert_bias"):
                t.copy_(0.3 * torch.rand_like(t))
    return model.eval()


def test_mcore_to_hf_to_mcore_is_bit_exact_and_loads_in_transformers(world, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _random_megatron_model(CARD)
    mcore_io.save_mcore(model, CARD, tmp_path / "mc")
    hf_out = tmp_path / "hf"
    export = ["convert", "mcore-to-hf", f"--ckpt={tmp_path / 'mc'}", f"--out={hf_out}", "--max-shard-mb=0.25"]
    assert r1m(export) == 0
    assert len(list(hf_out.glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
    assert r1m(["convert", "hf-to-mcore", "--hf", str(hf_out), "--out", str(tmp_path / "mc2")]) == 0
    back, _ = load_mcore_model(tmp_path / "mc2")
    want, got = model.state_dict(), back.state_dict()
    weights = [k for k in want if hf.is_weight(k)]
    assert any(k.endswith("expert_bias") for k in weights)
    for k in weights:
        assert torch.equal(want[k], got[k]), k

    ref = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()
    tokens = torch.randint(0, CARD.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (forward_logits(model, tokens) - ref(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def _edited_copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    shutil.copytree(src, dst)
    if edit_tensors:
        (f,) = dst.glob("*.safetensors")
        tensors = load_file(f)
        edit_tensors(tensors)
        save_file(tensors, str(f), metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _import(d: Path):
    cfg = hf_io.read_hf_config(d)
    ckpt = hf_io.HFCheckpoint(d)
    hf.import_weights(build_model(cfg), ckpt, cfg, ckpt.keys())


BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"
Q_A = "model.layers.0.self_attn.q_a_proj.weight"
BAD_CHECKPOINTS = {
    "missing": (dict(edit_tensors=lambda t: t.pop(BIAS)), f"missing key '{BIAS}'"),
    "unknown": (
        dict(edit_tensors=lambda t: t.__setitem__("model.layers.0.self_attn.rotary.weight", torch.zeros(2))),
        "unknown key 'model.layers.0.self_attn.rotary.weight'",
    ),
    "shape": (
        dict(edit_tensors=lambda t: t.__setitem__(Q_A, torch.zeros(16, 64))),
        f"shape mismatch: '{Q_A}' (16, 64) but megatron "
        "'decoder.layers.0.self_attention.linear_q_down_proj.weight' is (32, 64)",
    ),
    "config_more_experts": (
        dict(edit_config=lambda c: c.__setitem__("n_routed_experts", 16)),
        "shape mismatch: 'model.layers.1.mlp.gate.weight' (8, 64) but megatron "
        "'decoder.layers.1.mlp.router.weight' is (16, 64)",
    ),
    "config_wider": (dict(edit_config=lambda c: c.__setitem__("hidden_size", 96)), "shape mismatch"),
    "mtp_copy_differs": (
        dict(edit_tensors=lambda t: t["model.layers.2.embed_tokens.weight"].add_(1.0)),
        "'model.layers.2.embed_tokens.weight' differs from 'model.embed_tokens.weight'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_hf_checkpoint_is_a_clear_error(hf_dir, tmp_path, case):
    edits, message = BAD_CHECKPOINTS[case]
    bad = _edited_copy(hf_dir, tmp_path / "bad", **edits)
    with pytest.raises(hf.ConversionError) as err:
        _import(bad)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_reports_card_disagreeing_with_config(hf_dir, tmp_path, capsys):
    rc = r1m(["convert", "hf-to-mcore", f"--hf={hf_dir}", f"--out={tmp_path / 'o'}", "--card=micro_moe"])
    assert rc == 1
    assert "model card 'micro_moe' has yarn_factor=None but config.json has 4.0" in capsys.readouterr().err


def test_mcore_checkpoint_disagreeing_with_its_card_is_an_error(world, tmp_path):
    mcore_io.save_mcore(_random_megatron_model(CARD), CARD, tmp_path / "mc")
    card = (tmp_path / "mc" / mcore_io.CARD_FILE)
    card.write_text(card.read_text().replace("ffn_hidden_size: 128", "ffn_hidden_size: 256"))
    with pytest.raises(hf.ConversionError, match="does not match model_card.yaml: Global shape") as err:
        load_mcore_model(tmp_path / "mc")
    assert "decoder.layers.0.mlp.linear_fc1.weight" in str(err.value) and "\n" not in str(err.value)


def test_unknown_megatron_name_is_an_error():
    with pytest.raises(hf.ConversionError, match="'decoder.layers.0.self_attention.rotary.weight'"):
        hf.hf_names("decoder.layers.0.self_attention.rotary.weight", CARD)


def test_fused_splits_apply_per_tensor_parallel_shard():
    qwen = replace(load_card("qwen2_tiny"), num_attention_heads=8, num_key_value_heads=4, hidden_size=64)
    d, groups, q_per_group, tp = 8, 4, 2, 2
    q = torch.randn(groups * q_per_group * d, 64)
    k, v = torch.randn(groups * d, 64), torch.randn(groups * d, 64)
    full = hf.merge_fused("qkv", [q, k, v], qwen)
    assert [torch.equal(a, b) for a, b in zip(hf.split_fused("qkv", full, qwen), (q, k, v))] == [True] * 3
    # megatron's TP shard r of linear_qkv holds whole query groups: rows [r * n/tp, (r+1) * n/tp)
    parts = [hf.split_fused("qkv", shard, qwen) for shard in full.chunk(tp, dim=0)]
    for i, want in enumerate((q, k, v)):
        assert torch.equal(torch.cat([p[i] for p in parts], dim=0), want)
    # megatron's TP shard r of a SwiGLU linear_fc1 is [gate_r; up_r]
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    shards = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
    split = [hf.split_fused("gate_up", s, qwen) for s in shards]
    assert torch.equal(torch.cat([s[0] for s in split]), gate)
    assert torch.equal(torch.cat([s[1] for s in split]), up)

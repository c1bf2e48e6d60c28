"""FP8-blockwise HF checkpoints (the published DeepSeek-V3/R1 format) import dequantized.

A random micro_moe HF model is quantized here the way DeepSeek's checkpoints are (e4m3 weights, one
fp32 `weight_scale_inv` per [rows, cols] block, amax / 448), block by block with explicit loops; the
reference is each block's fp8 value times its factor in fp32, written as a plain fp32 HF directory.
- importing the FP8 directory (fp32 model) gives exactly the reference's weights, for 128x128 blocks
  (all partial here) and for 16x24 blocks (several per tensor, partial at the edges);
- `r1m convert hf-to-mcore` on the FP8 directory, then `mcore-to-hf`, gives back every reference
  tensor exactly;
- a bf16 model (a bf16 trainer's `checkpoint.load`) gets each weight dequantized in fp32, then
  rounded to bf16, as DeepSeek's fp8_cast_bf16 writes it (rounding the fp8 value and its factor to
  bf16 first would differ);
- a slice of an FP8 tensor equals that slice of the whole one; what a tensor-parallel rank reads
  through hf_shard (its even piece of each weight) equals that piece of the dequantized tensor, and
  costs only the scale blocks covering it; an expert-parallel rank reads its experts' weights and
  scales and nothing else;
- `r1m score` on the FP8 directory gives the reference directory's log-probs exactly;
- an unknown quantization method, or an FP8 weight without its scale, is a one-line error.

The dequantization runs on the host, whatever the machine; the models are built on its device (the
CPU here; on a CUDA machine the CUDA path, where these tests have not run yet).
"""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1_megatron.checkpoint import hf, hf_io, hf_shard
from r1_megatron.cli import main as r1m
from r1_megatron.config.loader import load_card, load_config
from r1_megatron.model.random_hf import make_hf_checkpoint
from r1_megatron.parallel.device import seed_all, single_rank_world
from r1_megatron.parallel.groups import resolve_layout
from r1_megatron.train.convert_job import load_hf_model
from r1_megatron.train.trainer import Trainer
from r1_megatron.train.weights import load_initial_weights

CARD = replace(load_card("micro_moe"))
FP8_MAX = 448.0  # largest finite float8_e4m3fn



@pytest.fixture(scope="module")
def world() -> torch.device:
    return single_rank_world(0)


@pytest.fixture(scope="module")
def original(tmp_path_factory, world) -> Path:
    out = tmp_path_factory.mktemp("orig")
    make_hf_checkpoint(CARD, out, seed=4)
    return out


def _quantized(name: str, w: torch.Tensor) -> bool:
    # As published: the linear weights inside the layers; not norms, router, embeddings or eh_proj.
    linear = name.startswith("model.layers.") and name.endswith("_proj.weight") and "eh_proj" not in name
    return w.dim() == 2 and linear


def _quantize(w: torch.Tensor, block: tuple[int, int]):
    """(fp8 weight, scale_inv [ceil(R/br), ceil(C/bc)], dequantized fp32) block by block."""
    (rows, cols), (br, bc) = w.shape, block
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(rows / br), math.ceil(cols / bc))
    deq = torch.empty(rows, cols)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc))
            s = w[sl].abs().max().clamp(min=1e-12) / FP8_MAX
            q[sl] = (w[sl] / s).to(torch.float8_e4m3fn)
            scale[i, j] = s
            deq[sl] = q[sl].to(torch.float32) * s
    return q, scale, deq


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _fp8_pair(src: Path, out: Path, block: tuple[int, int]) -> tuple[Path, Path]:
    """(FP8 directory, fp32 reference directory of its dequantized weights)."""
    tensors = _tensors(src)
    config = json.loads((src / "config.json").read_text())
    fp8, ref = {}, {}
    for name, w in sorted(tensors.items()):
        if _quantized(name, w):
            q, scale, deq = _quantize(w, block)
            fp8[name], fp8[name + "_scale_inv"], ref[name] = q, scale, deq
        else:
            fp8[name] = ref[name] = w
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block),
             "activation_scheme": "dynamic"}
    # small shards: a weight and its scale may land in different files, as in the published index
    fp8_config = {**config, "quantization_config": quant}
    fp8_dir = hf_io.save_hf(out / "fp8", fp8.items(), fp8_config, max_shard_bytes=40_000)
    ref_dir = hf_io.save_hf(out / "ref", ref.items(), config)
    return fp8_dir, ref_dir


@pytest.fixture(scope="module", params=[(128, 128), (16, 24)], ids=["128x128", "16x24"])
def pair(request, original, tmp_path_factory):
    return _fp8_pair(original, tmp_path_factory.mktemp("fp8"), request.param)


def test_fp8_import_equals_the_dequantized_weights(pair, original):
    fp8_dir, ref_dir = pair
    assert len(list(fp8_dir.glob("*.safetensors"))) > 2
    got, _ = load_hf_model(fp8_dir)
    want, _ = load_hf_model(ref_dir)
    exact, _ = load_hf_model(original)
    want_sd, exact_sd = want.state_dict(), exact.state_dict()
    changed = 0
    for name, t in got.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        assert torch.equal(t, want_sd[name]), name
        changed += not torch.equal(t, exact_sd[name])
    assert changed > 20  # the quantization did change the linear weights


def test_convert_cli_round_trip_equals_the_dequantized_weights(pair, tmp_path):
    fp8_dir, ref_dir = pair
    mc, back_dir = str(tmp_path / "mc"), str(tmp_path / "back")
    assert r1m(["convert", "hf-to-mcore", "--hf", str(fp8_dir), "--out", mc]) == 0
    assert r1m(["convert", "mcore-to-hf", "--ckpt", mc, "--out", back_dir]) == 0
    back, want = _tensors(Path(back_dir)), _tensors(ref_dir)
    assert set(back) == set(want)
    for name, t in want.items():
        assert torch.equal(back[name], t), name
    scaled = hf_io.HFCheckpoint(fp8_dir).scales
    assert len(scaled) > 20 and not any(n.endswith(hf_io.SCALE_SUFFIX) for n in back)


def _dequantized_in_bf16(ckpt: hf_io.HFCheckpoint, name: str) -> torch.Tensor:
    """The shortcut fp8_cast_bf16 does not take: fp8 value and block factor each rounded to bf16 first."""
    q = ckpt._read(name, 0, 0, None).to(torch.bfloat16)
    scale = ckpt._read(ckpt.scales[name], 0, 0, None).to(torch.bfloat16)
    full = scale.repeat_interleave(ckpt.block[0], 0).repeat_interleave(ckpt.block[1], 1)
    return q * full[: q.shape[0], : q.shape[1]]


def test_bf16_model_gets_fp32_dequantized_weights_rounded_to_bf16(pair, world):
    fp8_dir, ref_dir = pair
    cfg = load_config(None, ["model.card=micro_moe", "model.dtype=bfloat16"])
    seed_all(cfg.seed)
    trainer = Trainer(cfg, resolve_layout(cfg, 1), world, for_training=False)
    load_initial_weights(trainer, str(fp8_dir))
    ref, fp8 = hf_io.HFCheckpoint(ref_dir), hf_io.HFCheckpoint(fp8_dir)
    got = dict(hf.export_weights(trainer.unwrapped, cfg.model))
    assert set(got) == set(ref.keys())
    shortcut_differs = 0
    for name, t in got.items():
        want = ref.read(name)  # fp8 x factor in fp32 (or the unquantized tensor)
        if name in fp8.scales:
            assert t.dtype == torch.bfloat16, name
            shortcut_differs += not torch.equal(_dequantized_in_bf16(fp8, name), want.to(torch.bfloat16))
        assert torch.equal(t.cpu(), want.to(t.dtype)), name
    assert shortcut_differs > 0  # the order of rounding shows in these weights


def test_fp8_slices_equal_the_whole_tensor(pair):
    fp8_dir, ref_dir = pair
    ckpt, ref = hf_io.HFCheckpoint(fp8_dir), hf_io.HFCheckpoint(ref_dir)
    names = [n for n in ckpt.keys() if n in ckpt.scales]
    assert names and not any(n.endswith("_scale_inv") for n in ckpt.keys())
    for name in names[:12]:
        whole = ckpt.read(name)
        assert whole.dtype == torch.float32 and torch.equal(whole, ref.read(name)), name
        for dim in (0, 1):
            n = whole.shape[dim]
            for start, length in ((0, n), (5, n - 9), (n // 2, n - n // 2), (15, 2), (n - 1, 1)):
                got = ckpt.read(name, dim, start, length)
                assert torch.equal(got, whole.narrow(dim, start, length)), (name, dim, start, length)


def test_fp8_shards_equal_the_pieces_of_the_dequantized_tensor(pair):
    """What a rank of a (tp, ep) split reads through hf_shard (checkpoint/hf_shard.py `_read_part`)."""
    fp8_dir, ref_dir = pair
    ref, block = hf_io.HFCheckpoint(ref_dir), hf_io.HFCheckpoint(fp8_dir).block
    names = sorted(hf_io.HFCheckpoint(fp8_dir).scales)
    pieces = 0
    for name in names:
        whole = ref.read(name)
        for dim in (0, 1):
            scale_rows = math.ceil(whole.shape[1 - dim] / block[1 - dim])  # along the other dim
            for size in (2, 4):
                n = whole.shape[dim] // size
                if whole.shape[dim] % size:
                    continue
                for r in range(size):
                    ckpt = hf_io.HFCheckpoint(fp8_dir, verify="off")
                    got = hf_shard._read_part(ckpt, name, (dim, r, size))
                    assert torch.equal(got, whole.narrow(dim, r * n, n)), (name, dim, r, size)
                    blocks = math.ceil((r + 1) * n / block[dim]) - r * n // block[dim]
                    assert ckpt.bytes_read == got.numel() + 4 * blocks * scale_rows, (name, dim, r, size)
                    pieces += 1
    assert pieces > 4 * len(names)
    expert = {n: int(m[1]) for n in names if (m := re.search(r"\.experts\.(\d+)\.", n))}
    for ep in (2, 4):
        for r in range(ep):
            ckpt = hf_io.HFCheckpoint(fp8_dir, verify="off")
            mine = [n for n, e in expert.items() if e * ep // CARD.num_experts == r]
            for name in mine:
                assert torch.equal(hf_shard._read_part(ckpt, name, None), ref.read(name)), name
            assert mine and ckpt.names_read == {*mine, *(n + hf_io.SCALE_SUFFIX for n in mine)}


def test_score_on_fp8_dir_matches_the_reference(pair, tmp_path):
    fp8_dir, ref_dir = pair
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(json.dumps({"tokens": [(7 * i + j) % CARD.vocab_size for j in range(12)]})
                                  for i in range(3)))
    out = {}
    for tag, d in (("fp8", fp8_dir), ("ref", ref_dir)):
        argv = ["score", "--ckpt", str(d), "--input", str(requests), "--output", str(tmp_path / tag)]
        assert r1m(argv) == 0
        out[tag] = [json.loads(line)["logprobs"] for line in (tmp_path / tag).read_text().splitlines()]
    assert out["fp8"] == out["ref"]


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "r1m_manifest.json").unlink()  # an edited directory, as a user would have it
    return dst


def test_unknown_quantization_method_is_a_one_line_error(pair, tmp_path):
    d = _edit_config(pair[0], tmp_path / "awq", quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(hf.ConversionError, match="quant_method 'awq' is not supported"):
        hf_io.read_hf_config(d)
    run = subprocess.run([sys.executable, "-m", "r1_megatron.cli", "convert", "hf-to-mcore", "--hf", str(d),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})  # megatron's import warnings
    assert run.returncode == 1 and "quant_method 'awq' is not supported" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_fp8_weight_without_its_scale_is_an_error(pair, tmp_path):
    d = _edit_config(pair[0], tmp_path / "noscale")
    index = json.loads((d / hf_io.INDEX).read_text())
    gone = next(k for k in index["weight_map"] if k.endswith("_scale_inv"))
    del index["weight_map"][gone]
    (d / hf_io.INDEX).write_text(json.dumps(index))
    weight = gone.removesuffix("_scale_inv")
    with pytest.raises(hf.ConversionError, match=f"'{weight}' is torch.float8_e4m3fn but has no '{gone}'"):
        hf_io.HFCheckpoint(d).read(weight)

"""Damaged checkpoint files are one-line errors naming the file, from every entry point.

Every directory r1m writes (a megatron checkpoint from `convert hf-to-mcore`, an HF directory from
`convert mcore-to-hf`) carries r1m_manifest.json with each file's size and CRC32 (checked here with
binascii, not the code under test). A shard that is truncated, deleted or has one bit flipped makes
`r1m score` and `r1m convert` (real subprocesses) exit non-zero with a single stderr line that names
the file; `--verify size` skips the checksums (a bit flip then goes through, a truncation does not);
a truncated safetensors file without any manifest (a download) is named from its own header; the
weights-only load behind `checkpoint.load` raises the same one-line error, and `r1m sft` with a
damaged `checkpoint.load` exits 2 with that one line (r1m prints checkpoint errors as config errors).
"""

import binascii
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1_megatron.checkpoint import dist as dist_ckpt
from r1_megatron.checkpoint import integrity
from r1_megatron.train.convert_job import hf_to_mcore, mcore_to_hf
from r1_megatron.config.loader import load_card
from r1_megatron.model.provider import build_model
from r1_megatron.model.random_hf import make_hf_checkpoint
from r1_megatron.parallel.device import single_rank_world

CARD = load_card("micro_moe")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU-path test; CUDA runs the gpu-marked tests"
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    single_rank_world(0, device=torch.device("cpu"))
    root = tmp_path_factory.mktemp("integrity")
    make_hf_checkpoint(CARD, root / "download", seed=6)  # saved by transformers: no manifest
    mcore = hf_to_mcore(root / "download", root / "mcore")
    hf = mcore_to_hf(mcore, root / "hf", max_shard_mb=0.2)
    (root / "in.jsonl").write_text(json.dumps({"tokens": [3, 5, 7, 11, 13]}) + "\n")
    return {"download": root / "download", "mcore": mcore, "hf": hf, "input": root / "in.jsonl"}


def _shard(d: Path) -> Path:
    return sorted([*d.glob("*.safetensors"), *d.glob("__*.distcp")])[0]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif how == "delete":
        path.unlink()
    else:  # one bit, in the middle: tensor data (the headers stay readable)
        data[len(data) // 2] ^= 0x04
        path.write_bytes(data)


def _run(*args: str) -> subprocess.CompletedProcess:
    # megatron's import-time warnings (no TE / apex on CPU) are not the error under test
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "r1_megatron.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def _entry(entry: str, ckpt: Path, tmp: Path, inp: Path, *extra: str) -> subprocess.CompletedProcess:
    if entry == "score":
        return _run("score", "--ckpt", str(ckpt), "--input", str(inp), "--output", str(tmp / "o"), *extra)
    mcore = (ckpt / "metadata.json").is_file()
    direction, flag = ("mcore-to-hf", "--ckpt") if mcore else ("hf-to-mcore", "--hf")
    return _run("convert", direction, flag, str(ckpt), "--out", str(tmp / "converted"), *extra)


def test_manifests_hold_sizes_and_crc32(dirs):
    for kind, must in (("mcore", {".metadata", "common.pt", "metadata.json"}), ("hf", {"config.json"})):
        files = json.loads((dirs[kind] / integrity.MANIFEST).read_text())["files"]
        assert must <= set(files) and _shard(dirs[kind]).name in files
        for name, entry in files.items():
            data = (dirs[kind] / name).read_bytes()
            assert entry == {"size": len(data), "crc32": f"{binascii.crc32(data):08x}"}, name
    assert len(list(dirs["hf"].glob("*.safetensors"))) > 2


CASES = [("hf", "truncate", "score"), ("hf", "flip", "convert"), ("hf", "delete", "score"),
         ("mcore", "truncate", "convert"), ("mcore", "flip", "score"), ("mcore", "delete", "convert")]


@pytest.mark.parametrize("kind,how,entry", CASES, ids=["-".join(c) for c in CASES])
def test_damaged_shard_is_one_line_naming_the_file(dirs, tmp_path, kind, how, entry):
    ckpt = shutil.copytree(dirs[kind], tmp_path / "ckpt")
    shard = _shard(ckpt)
    _damage(shard, how)
    run = _entry(entry, ckpt, tmp_path, dirs["input"])
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt checkpoint" in lines[0] and str(shard) in lines[0], run.stderr
    expected = {"truncate": "bytes, the manifest says", "delete": "missing",
                "flip": "differs from the manifest"}
    assert expected[how] in lines[0]


def test_verify_size_skips_the_checksums(dirs, tmp_path):
    ckpt = shutil.copytree(dirs["hf"], tmp_path / "ckpt")
    _damage(_shard(ckpt), "flip")
    assert _entry("score", ckpt, tmp_path, dirs["input"], "--verify", "size").returncode == 0
    _damage(_shard(ckpt), "truncate")
    run = _entry("score", ckpt, tmp_path, dirs["input"], "--verify", "size")
    assert run.returncode != 0 and "the manifest says" in run.stderr


def test_truncated_download_without_manifest_is_named_from_its_header(dirs, tmp_path):
    ckpt = shutil.copytree(dirs["download"], tmp_path / "ckpt")
    assert not (ckpt / integrity.MANIFEST).exists()
    shard = _shard(ckpt)
    _damage(shard, "truncate")
    run = _entry("convert", ckpt, tmp_path, dirs["input"])
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1, run.stderr
    assert str(shard) in lines[0] and "its safetensors header needs" in lines[0]


def test_initial_weights_load_names_the_damaged_file(dirs, tmp_path):
    """What `checkpoint.load` runs (train/weights.py load_initial_weights) for a megatron directory."""
    ckpt = shutil.copytree(dirs["mcore"], tmp_path / "ckpt")
    shard = _shard(ckpt)
    _damage(shard, "flip")
    model = build_model(CARD, device=torch.device("cpu"))
    with pytest.raises(integrity.CorruptCheckpoint) as err:
        dist_ckpt.load_model_weights(model, ckpt, "full")
    assert str(shard) in str(err.value) and "\n" not in str(err.value)
    dist_ckpt.load_model_weights(model, ckpt, "off")  # the flipped bit is in the data: it loads unchecked


def test_checkpoint_load_in_r1m_sft_is_one_line_exit_2(dirs, tmp_path):
    """The same through a real job: `r1m sft` with checkpoint.load naming the damaged directory."""
    ckpt = shutil.copytree(dirs["mcore"], tmp_path / "ckpt")
    shard = _shard(ckpt)
    _damage(shard, "truncate")
    run = _run("sft", "configs/micro_moe_sft.yaml", f"checkpoint.load={ckpt}",
               f"logging.run_dir={tmp_path / 'run'}")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("r1m sft: checkpoint error: corrupt checkpoint:") and str(shard) in lines[0]

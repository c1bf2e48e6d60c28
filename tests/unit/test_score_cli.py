"""`r1m score` returns transformers' per-token log-probs, from an HF directory or a megatron checkpoint.

Guarantees:
- On an HF DeepseekV3 directory (with an MTP layer), the logprobs of tokens[1:] equal
  log_softmax of transformers' own logits within 1e-4 (fp32), for sequences of different lengths;
  every input field is kept in the output.
- The megatron checkpoint converted from that directory gives the same logprobs (1e-6).
- Bad input (invalid JSON, missing/short "tokens", out-of-vocab ids) exits 1 with one line that names
  the file and line number, and writes no output.
"""

import json
from dataclasses import replace

import pytest
import torch

from r1_megatron.cli import main as r1m
from r1_megatron.config.loader import load_card
from r1_megatron.model.random_hf import make_hf_checkpoint
from r1_megatron.parallel.device import single_rank_world

CARD = replace(load_card("micro_moe"), yarn_factor=2.0, original_max_position=128)
LENGTHS = (2, 17, 40)

# These tests run the CPU path; on a CUDA machine the gpu-marked tests cover the transformer-engine path.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU-path test; CUDA runs the gpu-marked tests"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    single_rank_world(0, device=torch.device("cpu"))
    root = tmp_path_factory.mktemp("score")
    ref = make_hf_checkpoint(CARD, root / "hf", seed=9)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, CARD.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]
    inp = root / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "tokens": s}) + "\n" for i, s in enumerate(seqs)))
    return ref, root, seqs, inp


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hf_dir_scores_match_transformers_and_mcore_dir(setup):
    ref, root, seqs, inp = setup
    assert r1m(["score", f"--ckpt={root / 'hf'}", f"--input={inp}", f"--output={root / 'hf.jsonl'}"]) == 0
    rows = _read(root / "hf.jsonl")
    assert [r["id"] for r in rows] == list(range(len(seqs))) and [r["tokens"] for r in rows] == seqs
    for row, seq in zip(rows, seqs):
        ids = torch.tensor([seq])
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids).logits[0, :-1].float(), -1)
            logp = logp.gather(1, ids[0, 1:, None]).squeeze(1)
        assert len(row["logprobs"]) == len(seq) - 1
        torch.testing.assert_close(torch.tensor(row["logprobs"]), logp, rtol=0, atol=1e-4)

    assert r1m(["convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out", str(root / "mc")]) == 0
    assert r1m(["score", f"--ckpt={root / 'mc'}", f"--input={inp}", f"--output={root / 'mc.jsonl'}"]) == 0
    for a, b in zip(rows, _read(root / "mc.jsonl")):
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"tokens": [1, 2]}', "{not json"], ":2: not valid JSON"),
        (['{"tokens": [1]}'], ":1: 'tokens' must be a list of at least 2 token ids"),
        (['{"text": "hi"}'], ":1: 'tokens' must be a list"),
        (['{"tokens": [1, 128]}'], ":1: token 128 is not an id in [0, 128)"),
    ],
)
def test_bad_input_is_a_one_line_error(setup, tmp_path, capsys, lines, message):
    _, root, _, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert r1m(["score", "--ckpt", str(root / "hf"), "--input", str(bad), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()

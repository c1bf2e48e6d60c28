"""`r1m sft` and `r1m score` under torchrun with a layout, and bad layouts failing on every rank.

- `torchrun --nproc-per-node 2 -m r1_megatron.cli sft configs/micro_moe_sft.yaml parallel.pp=2 ...`
  trains, logs metrics.jsonl and leaves a committed checkpoint;
- `torchrun ... score --ckpt <that checkpoint> --tp 2` (the pipeline-aware trainer forward, vocab-
  parallel) gives the logprobs of the single-process `r1m score` (log_softmax of full logits) within
  1e-5;
- bad layouts give the same one-line error, naming the keys and numbers, on every rank, and every
  rank exits non-zero within the timeout.
"""

import json
import math
import subprocess
import sys

import pytest

from tests.dist._launch import REPO, free_port, launch, worker_env

SFT = ["configs/micro_moe_sft.yaml", "model.vocab_size=512", "optim.total_steps=2", "data.sft_examples=32",
       "data.sft_pairs_per_step=4", "data.seq_length=96"]


def _torchrun(args: list[str], nproc: int, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--max-restarts=0", "-m", "r1_megatron.cli", *args]
    env = worker_env(0, 1, 0)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_sft_then_score_under_torchrun(tmp_path):
    run = tmp_path / "run"
    sft = _torchrun(["sft", *SFT, f"logging.run_dir={run}", "parallel.pp=2"], 2, timeout=300)
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["sft/loss"]) and r["sft/loss"] > 0 for r in rows)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    ckpt = run / "checkpoints" / "step_000002"

    requests = tmp_path / "in.jsonl"
    token_lists = ([5, 9, 300, 2, 7, 7], [11, 400], [3] * 9)
    requests.write_text("\n".join(json.dumps({"tokens": t}) for t in token_lists))
    parallel_out, single_out = tmp_path / "tp2.jsonl", tmp_path / "single.jsonl"
    score = _torchrun(["score", "--ckpt", str(ckpt), "--input", str(requests), "--output", str(parallel_out),
                       "--tp", "2"], 2, timeout=300)
    assert score.returncode == 0, score.stdout[-3000:] + score.stderr[-3000:]
    single_cmd = [sys.executable, "-m", "r1_megatron.cli", "score", "--ckpt", str(ckpt),
                  "--input", str(requests), "--output", str(single_out)]
    single = subprocess.run(single_cmd, cwd=REPO, env=worker_env(0, 1, free_port()), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    got = [json.loads(line) for line in parallel_out.read_text().splitlines()]
    want = [json.loads(line) for line in single_out.read_text().splitlines()]
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    for g, w in zip(got, want):
        assert len(g["logprobs"]) == len(w["logprobs"]) == len(g["tokens"]) - 1
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) <= 1e-5


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=3"], "r1m sft: parallel.tp(3) does not divide model.num_attention_heads(4)"),
        (["parallel.tp=2", "parallel.pp=2"],
         "r1m sft: parallel: tp(2)*pp(2) = 4 does not divide world_size(2)"),
        (["parallel.ep=2", "parallel.etp=2"],
         "r1m sft: parallel: etp(2)*ep(2)*pp(1) = 4 does not divide world_size(2)"),
    ],
)
def test_bad_layout_fails_on_every_rank(tmp_path, overrides, message):
    results = launch(["-m", "r1_megatron.cli", "sft", *SFT, *overrides], 2, tmp_path, timeout=240)
    for r in results:
        assert r.returncode == 2, r.log[-2000:]
        errors = [line for line in r.log.splitlines() if line.startswith("r1m sft:")]
        assert errors == [message], r.log[-2000:]

"""Separate rollout engines (rollout/separate.py): vLLM in processes of their own, on a tiny random
DeepSeek-V3 (the tiny_moe card's shape).

Guarantees:
- two engine processes, each given a block of the prompts, sample exactly the tokens and logprobs the
  in-process engine samples for the same seeds, before and after a refit through the shared buffer;
  the refit leaves every engine's canary logprobs equal to the in-process engine's;
- killing one engine process mid-rollout restarts it (with the refitted weights) and re-issues its
  prompts: the call returns the same samples as without the kill;
- an engine that cannot be restarted ends the call with a RolloutError naming it, within the timeout.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.config.schema import RolloutConfig  # noqa: E402
from r1_megatron.rollout.engine import RolloutError, SamplingParams  # noqa: E402
from r1_megatron.rollout.refit import canary_sequences  # noqa: E402
from r1_megatron.rollout.separate import SeparateEngine  # noqa: E402
from r1_megatron.rollout.vllm_engine import VLLMEngine  # noqa: E402

from test_vllm_engine import build_tiny_hf, hf_weights  # noqa: E402 (rootdir-relative, as pytest imports it)

PROMPTS = [[3, 17, 29, 101, 250], [7, 7, 400, 12], [500, 2, 90, 91, 92, 93, 94], [11, 12], [300, 301, 302]]
SAMPLING = SamplingParams(temperature=1.0, max_tokens=10, stop_on_eos=False, seed=7)
CFG = RolloutConfig(placement="separate", engines=2, timeout_s=900.0)  # generous: a shared 2-core box


def _pairs(samples):
    return [[(s.token_ids, s.logprobs) for s in group] for group in samples]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("separate")
    build_tiny_hf(base / "a", seed=0)
    build_tiny_hf(base / "b", seed=1)
    return base / "a", hf_weights(base / "b")


def test_separate_engines_sample_like_the_in_process_engine(dirs):
    model_dir, new_weights = dirs
    canary = canary_sequences(vocab_size=512, length=24, count=2, seed=0)
    local = VLLMEngine(model_dir, CFG)
    try:
        want = [_pairs(local.generate(PROMPTS, 3, SAMPLING))]
        local.update_weights(new_weights.items())
        want.append(_pairs(local.generate(PROMPTS, 3, SAMPLING)))
        want_lp = local.logprobs(canary)
    finally:
        local.close()
    sep = SeparateEngine(model_dir, CFG, threads=1)
    try:
        got = [_pairs(sep.generate(PROMPTS, 3, SAMPLING))]
        sep.update_weights(new_weights.items())
        got.append(_pairs(sep.generate(PROMPTS, 3, SAMPLING)))
        got_lp = sep.logprobs(canary)  # also checks engine 1 against engine 0
        assert sep.weights_version == 1 and sep.restarts == 0
    finally:
        sep.close()
    assert got[0] != got[1]  # the refit changed what is sampled
    for g, w in zip(got, want, strict=True):
        assert [[t for t, _ in grp] for grp in g] == [[t for t, _ in grp] for grp in w]
        for gg, ww in zip(g, w, strict=True):
            for (_, a), (_, b) in zip(gg, ww, strict=True):
                assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    for a, b in zip(got_lp, want_lp, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def _kill_when_busy(sep: SeparateEngine, e: int) -> tuple[list[int], int]:
    """Kill engine e's process right after its next generate request is sent: the request is in
    flight, so the kill is mid-rollout whatever the machine's load (a timer could fire after the
    engine already answered). Returns (the pids killed, the pid before)."""
    pid, killed = sep._procs[e].pid, []
    send = sep._send

    def send_then_kill(index: int, msg: tuple) -> None:
        send(index, msg)
        if index == e and msg[0] == "generate" and not killed:
            killed.append(sep._procs[e].pid)
            sep._procs[e].process.kill()
            sep._procs[e].process.join(30)

    sep._send = send_then_kill
    return killed, pid


def test_killed_engine_is_restarted_and_its_prompts_reissued(dirs):
    model_dir, new_weights = dirs
    sep = SeparateEngine(model_dir, CFG, threads=1)
    try:
        sep.update_weights(new_weights.items())
        calls = sep._calls
        want = _pairs(sep.generate(PROMPTS, 3, SAMPLING))
        sep._calls = calls  # the same call number again: the same seeds
        killed, pid = _kill_when_busy(sep, 1)
        got = _pairs(sep.generate(PROMPTS, 3, SAMPLING))
        assert killed == [pid] and sep.restarts == 1 and sep._procs[1].pid != pid
        assert got == want  # the restarted engine reloaded the refit from the shared buffer
    finally:
        sep.close()


def test_engine_that_cannot_restart_fails_with_its_name(dirs, tmp_path):
    model_dir, _ = dirs
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    sep = SeparateEngine(copy, CFG, threads=1)
    try:
        (copy / "config.json").write_text("{}")  # a restart now fails to load
        killed, pid = _kill_when_busy(sep, 1)
        start = time.monotonic()
        with pytest.raises(RolloutError, match=r"rollout engine 1 .*could not start"):
            sep.generate(PROMPTS, 3, SAMPLING)
        assert killed == [pid]
        assert time.monotonic() - start < 2 * CFG.timeout_s
    finally:
        sep.close()


@pytest.mark.gpu
def test_gpu_refit_through_vllm_weight_transfer(dirs, tmp_path):
    """GPU: one engine on device 1 (the trainer holds device 0); a refit through vLLM's NCCL weight
    transfer gives the greedy tokens of an engine built from the new weights."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices: one for the trainer, one for the engine")
    model_dir, new_weights = dirs
    shutil.copytree(model_dir.parent / "b", tmp_path / "b")
    greedy = SamplingParams(temperature=0.0, max_tokens=12, stop_on_eos=False)
    cfg = RolloutConfig(placement="separate", engines=1, timeout_s=600.0, gpu_memory_utilization=0.3)
    want = SeparateEngine(tmp_path / "b", cfg)
    try:
        expected = want.generate(PROMPTS, 1, greedy)
    finally:
        want.close()
    sep = SeparateEngine(model_dir, cfg)
    try:
        sep.update_weights((k, v.cuda()) for k, v in new_weights.items())
        assert sep.weights_version == 1
        assert [[s.token_ids for s in g] for g in sep.generate(PROMPTS, 1, greedy)] == \
            [[s.token_ids for s in g] for g in expected]
    finally:
        sep.close()

"""The vLLM rollout engine against transformers, on a tiny random DeepSeek-V3 (the tiny_moe card's shape).

Guarantees:
- vLLM's fp32 teacher-forced logprobs equal transformers' within 1e-4, and the CPU rotary custom op
  we turn off is what breaks that (with it on, the error is far above the tolerance);
- the logprob `generate` reports for each sampled token (temperature 1) equals transformers'
  teacher-forced logprob of the same token within 1e-4; EOS stops a sample and is kept in it;
- a refit streamed in buckets, through the fast in-place path (`vllm_cpu_refit`), leaves every vLLM
  parameter bit-identical to an engine freshly loaded from the same weights, with equal greedy outputs
  and logprobs; a second refit, back to the old weights, restores the original parameters and outputs
  exactly (the CPU MoE re-pack bug would fail both); vLLM's full reload, the fallback, does the same;
- CPU linears compute from a oneDNN copy of their weights, so a write into lm_head.weight alone changes
  nothing, while the same change streamed through a refit shows in the logprobs;
- the refit canary scores the engine's own sampled continuation of its prompts (resampled after each
  refit); fed transformers' logprobs as the trainer's, it passes a correct refit and raises
  CanaryError naming the version when one expert's weights are corrupted in the stream (mean |error|
  above the fp32 tolerance); that expert's packed slice is the only engine tensor that differs from
  the uncorrupted weights';
- a failure inside vLLM mid-generation or mid-refit raises RolloutError naming the phase; the engine is
  rebuilt on its next use and refuses to sample stale weights until it is refitted;
- beside a multi-rank torch.distributed group (where vLLM would hang) the engine refuses to start.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.config.loader import load_card  # noqa: E402
from r1_megatron.config.schema import RolloutConfig  # noqa: E402
from r1_megatron.rollout import vllm_cpu_refit  # noqa: E402
from r1_megatron.rollout.engine import RolloutError, SamplingParams  # noqa: E402
from r1_megatron.rollout.refit import CanaryError, Refitter, canary_sequences, canary_tolerance  # noqa: E402
from r1_megatron.rollout.vllm_engine import VLLMEngine  # noqa: E402

TOL = 1e-4
PROMPTS = [[3, 17, 29, 101, 250], [7, 7, 400, 12], [500, 2, 90, 91, 92, 93, 94]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, stop_on_eos=False)
CANARY = canary_sequences(vocab_size=512, length=48, count=2, seed=0)


def build_tiny_hf(path, seed: int):
    """A random transformers DeepseekV3ForCausalLM with the tiny_moe card's shape, saved in fp32."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    card = load_card("tiny_moe")
    config = DeepseekV3Config(
        hidden_size=card.hidden_size, num_hidden_layers=card.num_layers,
        first_k_dense_replace=card.first_k_dense,
        num_attention_heads=card.num_attention_heads, num_key_value_heads=card.num_attention_heads,
        q_lora_rank=card.q_lora_rank, kv_lora_rank=card.kv_lora_rank, qk_nope_head_dim=card.qk_nope_head_dim,
        qk_rope_head_dim=card.qk_rope_head_dim, v_head_dim=card.v_head_dim, head_dim=card.qk_rope_head_dim,
        intermediate_size=card.ffn_hidden_size, moe_intermediate_size=card.moe_ffn_hidden_size,
        n_routed_experts=card.num_experts, num_experts_per_tok=card.router_topk, n_group=card.n_group,
        topk_group=card.topk_group, n_shared_experts=card.num_shared_experts, vocab_size=card.vocab_size,
        routed_scaling_factor=card.routed_scaling_factor, norm_topk_prob=card.norm_topk_prob,
        max_position_embeddings=card.max_position_embeddings, rope_theta=card.rope_theta,
        rms_norm_eps=card.rms_norm_eps, topk_method="noaux_tc", scoring_func="sigmoid",
        num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        initializer_range=0.1,  # wide enough that logprobs spread over several nats, not ~log(1/V)
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):  # a buffer: nonzero so losing it shows
                module.e_score_correction_bias.copy_(0.1 * torch.randn(module.e_score_correction_bias.shape))
    model.save_pretrained(path)
    return model


def hf_logprobs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Teacher-forced log p(tok[t+1] | tok[:t+1]) from transformers, one [L-1] tensor per sequence."""
    out = []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq])
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            out.append(logp.gather(1, ids[0, 1:, None])[:, 0])
    return out


def max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def hf_weights(path) -> dict[str, torch.Tensor]:
    """The saved checkpoint's tensors by HF name, in the published per-expert layout (what the
    trainer's export streams), the e_score_correction_bias buffers included."""
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def vllm_params(engine: VLLMEngine) -> dict[str, torch.Tensor]:
    def snapshot(worker):
        return {n: p.detach().clone() for n, p in worker.model_runner.get_model().named_parameters()}

    return engine.llm.collective_rpc(snapshot)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_moe_hf")
    a, b = build_tiny_hf(root / "A", seed=0), build_tiny_hf(root / "B", seed=1)
    return {"A": (root / "A", a), "B": (root / "B", b)}


@pytest.fixture(scope="module")
def rotary_on(models):
    """Logprobs from an engine built with every CPU custom op on, the rotary embedding included.
    Built before the shared engine: vLLM allows one live engine per process."""
    engine = VLLMEngine(models["A"][0], RolloutConfig(), cpu_custom_ops=["all"])
    out = engine.logprobs(CANARY)
    engine.close()
    return out


@pytest.fixture(scope="module")
def fresh_b(models, rotary_on):
    """What an engine freshly loaded from B computes (then the engine is dropped)."""
    engine = VLLMEngine(models["B"][0], RolloutConfig())
    ref = {"params": vllm_params(engine), "greedy": engine.generate(PROMPTS, 1, GREEDY),
           "logprobs": engine.logprobs(CANARY)}
    engine.close()
    return ref


@pytest.fixture(scope="module")
def engine(models, fresh_b):
    eng = VLLMEngine(models["A"][0], RolloutConfig())
    eng.original = {"params": vllm_params(eng), "greedy": eng.generate(PROMPTS, 1, GREEDY),
                    "logprobs": eng.logprobs(CANARY)}
    yield eng
    eng.close()


def test_logprobs_match_transformers(models, engine):
    _, model_a = models["A"]
    assert max_err(engine.logprobs(CANARY), hf_logprobs(model_a, CANARY)) <= TOL


def test_cpu_rotary_custom_op_breaks_mla_parity(models, rotary_on):
    """Guards the one setting that makes vLLM-CPU right: with the rotary op on, MLA is wrong."""
    assert max_err(rotary_on, hf_logprobs(models["A"][1], CANARY)) > 100 * TOL


def test_sampled_logprobs_match_teacher_forcing(models, engine):
    _, model_a = models["A"]
    sampling = SamplingParams(temperature=1.0, max_tokens=16, stop_on_eos=False, seed=5)
    groups = engine.generate(PROMPTS, 2, sampling)
    assert [len(g) for g in groups] == [2, 2, 2]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        assert group[0].token_ids != group[1].token_ids  # two draws, not one copied
        for s in group:
            assert len(s.token_ids) == len(s.logprobs) == 16 and s.truncated
            ref = hf_logprobs(model_a, [prompt + s.token_ids])[0][len(prompt) - 1:]
            assert max_err([torch.tensor(s.logprobs)], [ref]) <= TOL


def test_eos_stops_a_sample_and_is_kept(engine):
    greedy = engine.original["greedy"][0][0].token_ids
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    saved = engine.eos_ids
    engine.eos_ids = [greedy[k]]
    try:
        stop = engine.generate(PROMPTS[:1], 2, SamplingParams(temperature=0.0, max_tokens=12))[0]
    finally:
        engine.eos_ids = saved
    assert [s.token_ids for s in stop] == [greedy[: k + 1]] * 2
    assert all(s.finish_reason == "stop" and not s.truncated for s in stop)


def test_generate_stream_yields_groups_as_they_finish_and_aborts_the_rest(engine):
    """The rollout hands each prompt's group to the reward pool when its last sample ends: a prompt
    that stops at EOS comes out before the others; closing the stream there aborts the unfinished
    requests, and the engine goes on sampling exactly as before."""
    greedy = [g[0].token_ids for g in engine.original["greedy"]]
    k = next(i for i, t in enumerate(greedy[0]) if i > 0 and t not in greedy[0][:i] + greedy[1] + greedy[2])
    saved = engine.eos_ids
    engine.eos_ids = [greedy[0][k]]  # prompt 0 stops after k + 1 tokens; prompts 1 and 2 run to 12
    try:
        stream = engine.generate_stream(PROMPTS, 2, SamplingParams(temperature=0.0, max_tokens=12))
        first, group = next(stream)
        assert first == 0 and [s.token_ids for s in group] == [greedy[0][: k + 1]] * 2
        assert engine.llm.llm_engine.has_unfinished_requests()
        stream.close()
        assert not engine.llm.llm_engine.has_unfinished_requests()
    finally:
        engine.eos_ids = saved
    streamed = dict(engine.generate_stream(PROMPTS, 1, GREEDY))
    assert sorted(streamed) == [0, 1, 2]
    assert [streamed[i] for i in range(3)] == engine.original["greedy"] == engine.generate(PROMPTS, 1, GREEDY)


def assert_same_as(engine: VLLMEngine, ref: dict) -> None:
    got = vllm_params(engine)
    assert got.keys() == ref["params"].keys()
    assert [n for n in got if not torch.equal(got[n], ref["params"][n])] == []
    assert engine.generate(PROMPTS, 1, GREEDY) == ref["greedy"]
    assert max_err(engine.logprobs(CANARY), ref["logprobs"]) <= 1e-6


def test_refit_equals_fresh_load_then_restores(models, engine, fresh_b):
    """Two consecutive refits with different weights (A to B, then back to A), each checked against
    a freshly loaded engine; the first builds the fast path's map, the second only replays it."""
    weights_b = hf_weights(models["B"][0])
    refitter = Refitter(engine, bucket_mb=1.0)
    report = refitter.refit(iter(weights_b.items()))
    assert engine.refit_path == "fast"
    assert report["bytes"] == sum(t.numel() * t.element_size() for t in weights_b.values())
    assert report["tensors"] == len(weights_b) and report["buckets"] > 1
    split = report["split"]  # where the load's time went: every part measured, together within it
    assert set(split) == {"copy", "linear", "moe", "attention", "prefix_cache_reset"}
    assert all(v > 0 for v in split.values()) and sum(split.values()) <= report["seconds"]
    assert_same_as(engine, fresh_b)

    back = refitter.refit(iter(hf_weights(models["A"][0]).items()))
    assert engine.refit_path == "fast"
    assert back["version"] == report["version"] + 1 == engine.weights_version
    assert_same_as(engine, engine.original)


def test_linear_layers_compute_from_a_packed_copy(models, engine):
    """Why the refit rebuilds each linear's oneDNN handle: vLLM-CPU keeps lm_head.weight, but its
    matmul reads a packed copy, so an in-place write into the weight would be silently ignored."""
    weights = hf_weights(models["A"][0])
    engine.update_weights(iter(weights.items()))
    before = engine.logprobs(CANARY)

    def double_lm_head(worker):
        worker.model_runner.get_model().lm_head.weight.data.mul_(2.0)

    engine.llm.collective_rpc(double_lm_head)
    engine.llm.reset_prefix_cache()
    assert max_err(engine.logprobs(CANARY), before) == 0.0

    weights["lm_head.weight"] = 2.0 * weights["lm_head.weight"]
    engine.update_weights(iter(weights.items()))
    assert engine.refit_path == "fast"
    assert max_err(engine.logprobs(CANARY), before) > 0.1
    engine.update_weights(iter(hf_weights(models["A"][0]).items()))
    assert_same_as(engine, engine.original)


def test_canary_catches_one_corrupted_expert(models, engine, fresh_b):
    _, model_b = models["B"]
    refitter = Refitter(engine, bucket_mb=1.0, canary_tol=canary_tolerance(torch.float32, torch.float32),
                        canary_prompts=canary_sequences(vocab_size=512, length=16, count=2, seed=3))
    tokens = refitter.canary_tokens  # sampled by the engine with the weights it holds before the refit
    assert [t[:16] for t in tokens] == refitter.canary_prompts and all(len(t) == 32 for t in tokens)
    ok = refitter.refit(iter(hf_weights(models["B"][0]).items()),
                        reference=lambda toks: hf_logprobs(model_b, toks))
    assert ok["canary_mean_err"] <= ok["canary_max_err"] <= TOL
    assert refitter.canary_tokens != tokens  # the next canary: sampled from the new weights

    weights = hf_weights(models["B"][0])
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    noise = torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0))
    weights[name] = weights[name] + 0.5 * noise
    expected = rf"weights version {ok['version'] + 1}: mean \|logprob error\|"
    with pytest.raises(CanaryError, match=expected) as err:
        refitter.refit(iter(weights.items()), reference=hf_logprobs(model_b, refitter.canary_tokens))
    assert err.value.mean_err > refitter.canary_tol and "sequence" in str(err.value)
    assert engine.refit_path == "fast"
    got, want = vllm_params(engine), fresh_b["params"]
    w2 = "model.layers.1.mlp.experts.routed_experts.w2_weight"  # [expert, hidden, ffn], packed per expert
    assert [n for n in got if not torch.equal(got[n], want[n])] == [w2]
    assert [e for e in range(len(got[w2])) if not torch.equal(got[w2][e], want[w2][e])] == [3]


def test_full_reload_fallback_equals_fresh_load(models, engine, fresh_b, monkeypatch, caplog):
    """When vllm_cpu_refit declines a model (here as if its experts were not the CPU kernel's),
    refits take vLLM's full reload plus our MoE re-pack."""
    monkeypatch.setattr(vllm_cpu_refit, "_cpu_experts", lambda layer: None)
    engine.close()  # rebuilt at its next use, where the refit path is chosen again
    try:
        engine.update_weights(iter(hf_weights(models["B"][0]).items()))
        assert engine.refit_path == "full"
        assert "fast refit off: model.layers.1.mlp.experts.routed_experts (RoutedExperts)" in caplog.text
        assert_same_as(engine, fresh_b)
        engine.update_weights(iter(hf_weights(models["A"][0]).items()))
        assert engine.refit_path == "full"
        assert_same_as(engine, engine.original)
    finally:
        monkeypatch.undo()
        engine.close()


def test_failure_mid_generation_rebuilds_and_refuses_stale_weights(models, engine):
    weights_a = hf_weights(models["A"][0])
    engine.update_weights(iter(weights_a.items()))

    def boom(module, args, output):
        raise RuntimeError("injected fault in layer 1")

    engine.llm.apply_model(lambda model: model.model.layers[1].register_forward_hook(boom))
    with pytest.raises(RolloutError, match="during generate: RuntimeError: injected fault") as err:
        engine.generate(PROMPTS, 2, SamplingParams(max_tokens=8))
    assert err.value.phase == "generate"

    # Rebuilt from A's directory, but it had been refitted: no silent sampling of stale weights.
    with pytest.raises(RolloutError, match="call update_weights first"):
        engine.generate(PROMPTS, 1, GREEDY)
    engine.update_weights(iter(weights_a.items()))
    assert engine.generate(PROMPTS, 1, GREEDY) == engine.original["greedy"]


def test_failure_mid_refit_rebuilds(models, engine):
    weights = list(hf_weights(models["B"][0]).items())
    bad = weights[: len(weights) // 2] + [("model.layers.1.mlp.experts.99.up_proj.weight", weights[0][1])]
    with pytest.raises(RolloutError, match="during update_weights: KeyError.*experts.99.up_proj"):
        engine.update_weights(iter(bad))
    with pytest.raises(RolloutError, match="call update_weights first"):
        engine.logprobs(CANARY)
    engine.update_weights(iter(hf_weights(models["A"][0]).items()))
    assert max_err(engine.logprobs(CANARY), engine.original["logprobs"]) <= 1e-6


_TWO_RANKS = """
import os, sys, torch.distributed as dist, torch.multiprocessing as mp
from r1_megatron.config.schema import RolloutConfig
from r1_megatron.rollout.engine import RolloutError
from r1_megatron.rollout.vllm_engine import VLLMEngine

def rank(r, model_dir, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=r)
    if r == 0:
        try:
            VLLMEngine(model_dir, RolloutConfig(startup_timeout_s=5))
        except RolloutError as e:
            print("REFUSED:", e, flush=True)
    os._exit(0)  # no teardown handshake: rank 1 never joined rank 0's barrier

if __name__ == "__main__":
    mp.spawn(rank, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
"""


def test_a_lone_rank_building_an_engine_fails_instead_of_hanging(models, tmp_path):
    """In a 2-rank world every rank is a vLLM rank (external launcher) and vLLM's group setup is a
    collective over the world: an engine built on rank 0 alone would hang it. It fails within
    rollout.startup_timeout_s instead, naming the rank that did not come."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    out = subprocess.run([sys.executable, str(script), str(models["A"][0]), str(port)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    refused = "REFUSED: rollout engine failed during startup: not every rank started its rollout engine " \
              "within rollout.startup_timeout_s (5 s)"
    assert refused in out.stdout, out.stdout[-2000:]
    assert "1" in out.stdout.split("REFUSED:")[1]


@pytest.mark.gpu
def test_cuda_sleep_refit_wake_matches_transformers(models):
    """CUDA path: release (sleep level 1), refit while asleep, resume, then parity with transformers."""
    path, model_a = models["A"]
    eng = VLLMEngine(path, RolloutConfig(gpu_memory_utilization=0.3), device="cuda")
    try:
        eng.release()
        eng.update_weights(iter(hf_weights(models["B"][0]).items()))
        eng.resume()
        assert max_err(eng.logprobs(CANARY), hf_logprobs(models["B"][1], CANARY)) <= TOL
        eng.release()
        eng.update_weights(iter(hf_weights(models["A"][0]).items()))
        eng.resume()
        assert max_err(eng.logprobs(CANARY), hf_logprobs(model_a, CANARY)) <= TOL
    finally:
        eng.close()


def test_cuda_engine_asks_for_the_refit_compatible_moe_backend(models, monkeypatch):
    """Argument building only (no engine starts): on CUDA the engine asks vLLM for the Triton MoE
    kernels, whose weights stay in checkpoint layout (see VLLMEngine._llm_kwargs); vLLM takes the
    name. On CPU no backend is named: vLLM-CPU has one, and our refit re-packs for it."""
    import dataclasses
    from typing import get_args

    from vllm.config.kernel import MoEBackend
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    eng = VLLMEngine.__new__(VLLMEngine)
    eng.model_dir, eng.cfg, eng.device, eng.cpu_custom_ops = models["A"][0], RolloutConfig(), "cuda", ["all"]
    eng.dummy_weights, eng.world, eng.routing = False, 1, None
    kw = eng._llm_kwargs()
    assert kw["moe_backend"] == "triton" and "triton" in get_args(MoEBackend)
    assert "moe_backend" in {f.name for f in dataclasses.fields(EngineArgs)}
    eng.device = "cpu"
    assert "moe_backend" not in eng._llm_kwargs()

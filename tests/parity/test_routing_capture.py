"""Rollout routing capture (rollout/routing_capture.py) against transformers' own DeepSeek-V3 router.

Guarantees:
- CPU path: every sample vLLM generates (several prompts, n > 1, different lengths, one engine batch)
  carries uint8 [P + R - 1, moe_layers, topk] routed experts, and on every MoE layer and position the
  set of ids equals the grouped top-k that transformers' DeepseekV3TopkRouter computes in fp32 on the
  same weights and tokens (100%); dense layers carry no rows;
- greedy copies share one sample's routing;
- GPU path: vLLM's enable_return_routed_experts yields the same format (gpu-marked, not run here).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.config.loader import load_card  # noqa: E402
from r1_megatron.config.schema import RolloutConfig  # noqa: E402
from r1_megatron.rollout.engine import SamplingParams  # noqa: E402
from r1_megatron.rollout.routing_capture import RoutingCapture  # noqa: E402
from r1_megatron.rollout.vllm_engine import VLLMEngine  # noqa: E402
from tests.parity.test_vllm_engine import build_tiny_hf  # noqa: E402

PROMPTS = [[3, 17, 29, 101, 250], [7, 7, 400, 12], [500, 2, 90, 91, 92, 93, 94]]


def hf_routing(model, seq: list[int]) -> torch.Tensor:
    """[len(seq), moe_layers, topk]: transformers' chosen experts (sorted) at every position."""
    got = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: got.append(out[2].detach()))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        model(torch.tensor([seq]))
    for h in hooks:
        h.remove()
    return torch.stack(got, dim=1).sort(dim=-1)[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_moe_hf")
    model = build_tiny_hf(path, seed=3)
    capture = RoutingCapture.for_hf_config(json.loads((path / "config.json").read_text()))
    engine = VLLMEngine(path, RolloutConfig(dtype="float32"), device="cpu", routing=capture)
    yield model, engine, capture
    engine.close()


def test_captured_ids_equal_transformers_grouped_topk(tiny):
    model, engine, capture = tiny
    card = load_card("tiny_moe")
    assert capture.num_moe == card.num_layers - card.first_k_dense and capture.first_moe_layer == card.first_k_dense
    sampling = SamplingParams(temperature=1.0, max_tokens=10, stop_on_eos=False, seed=5)
    groups = engine.generate(PROMPTS, n=3, sampling=sampling)
    checked = 0
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for s in group:
            seq = prompt + s.token_ids
            r = s.routed_experts
            assert r.dtype == torch.uint8
            assert tuple(r.shape) == (len(seq) - 1, capture.num_moe, card.router_topk)
            want = hf_routing(model, seq)[: len(seq) - 1]
            assert torch.equal(r.long().sort(dim=-1)[0], want), "captured routing != transformers' top-k"
            checked += r.shape[0] * r.shape[1]
    assert checked > 0


def test_greedy_copies_share_routing(tiny):
    _model, engine, _capture = tiny
    (group,) = engine.generate(PROMPTS[:1], n=2, sampling=SamplingParams(temperature=0.0, max_tokens=6, stop_on_eos=False))
    assert group[0].routed_experts is group[1].routed_experts


@pytest.mark.gpu
def test_gpu_return_routed_experts(tmp_path):
    model = build_tiny_hf(tmp_path, seed=3)
    capture = RoutingCapture.for_hf_config(json.loads((tmp_path / "config.json").read_text()))
    engine = VLLMEngine(tmp_path, RolloutConfig(dtype="float32", gpu_memory_utilization=0.3), device="cuda",
                        routing=capture)
    try:
        groups = engine.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=1.0, max_tokens=8, stop_on_eos=False, seed=1))
        for prompt, group in zip(PROMPTS, groups, strict=True):
            for s in group:
                seq = prompt + s.token_ids
                want = hf_routing(model.cuda(), seq).cpu()[: len(seq) - 1]
                assert torch.equal(s.routed_experts.long().sort(dim=-1)[0], want)
    finally:
        engine.close()

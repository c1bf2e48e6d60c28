"""Every CPU fix in r1_megatron/parallel/compat_cpu.py is needed and works, against pinned megatron-core.

For each fix, one test asserts that the upstream behaviour it works around still exists (so the test
fails when megatron-core changes under the patch and the patch can go) and one exercises the patched
path. Paths:
- module-scoped torch proxy: single-rank build + training step through megatron's schedule (rotary,
  YaRN, router, alltoall dispatcher, MTP tracker, schedules, track_moe_metrics); a 2-rank gloo run
  with TP2 + sequence parallel + EP2 (mappings, layers, alltoall split sizes) and PP2 (p2p) whose
  losses equal the single-rank loss; dist_checkpointing save (tests/unit/test_convert.py and here).
- RNG tracker, HAVE_TE in MLA, te_general_gemm, clip_grads, the uncompiled expert-bias counter.
- The local-spec gaps filled by the layer spec (SDPAttention, RMSNorm) against their upstream modules.
- activate() is idempotent and does nothing where CUDA is available.
"""

import inspect
import math
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from r1_megatron.config.loader import load_card
from r1_megatron.config.schema import ParallelConfig
from r1_megatron.model.provider import build_model
from r1_megatron.parallel import compat_cpu
from r1_megatron.parallel.compat_cpu import REPLACED
from r1_megatron.parallel.device import single_rank_world

CARD = replace(load_card("micro_moe"), yarn_factor=2.0, original_max_position=128)
TOKENS = torch.randint(0, CARD.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

# These tests run the CPU path; on a CUDA machine the gpu-marked tests cover the transformer-engine path.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU-path test; CUDA runs the gpu-marked tests"
)


@pytest.fixture(scope="module")
def world():
    return single_rank_world(0, device=torch.device("cpu"))


def _original(key: str):
    assert key in REPLACED, f"activate() did not replace {key}"
    return REPLACED[key]


def test_activate_is_idempotent_and_a_noop_with_cuda(world):
    assert compat_cpu.activate() is True and compat_cpu.activate() is True
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from r1_megatron.parallel import compat_cpu\n"
        "assert compat_cpu.activate() is False and not compat_cpu.REPLACED and not compat_cpu.is_active()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("module_name", list(compat_cpu.CUDA_DEVICE_MODULES))
def test_listed_modules_still_ask_for_cuda_and_see_the_cpu_proxy(world, module_name):
    module = sys.modules[module_name]
    source = inspect.getsource(module)
    assert any(s in source for s in ("torch.cuda.", 'device="cuda"', "device='cuda'")), module_name
    assert isinstance(module.torch, compat_cpu._CpuTorch)


def test_cpu_torch_proxy_maps_cuda_requests_and_leaves_torch_alone(world):
    proxy = sys.modules["megatron.core.transformer.moe.router"].torch
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.empty_like(torch.ones(1), device=proxy.device("cuda")).device.type == "cpu"
    assert proxy.cuda.current_device() == "cpu" and proxy.Tensor is torch.Tensor
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()  # the real torch still has no CUDA


def test_rng_tracker_forks_cpu_states(world):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    with pytest.raises((AssertionError, RuntimeError)):
        _original("megatron.core.tensor_parallel.random.CudaRNGStatesTracker")().add("x", 1)
    draws = []
    for _ in range(2):
        model_parallel_cuda_manual_seed(123)
        torch.manual_seed(7)
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        draws.append((forked, torch.rand(4)))
    assert torch.equal(draws[0][0], draws[1][0])  # the tracker's stream is seeded
    torch.manual_seed(7)
    assert torch.equal(draws[0][1], torch.rand(4))  # and forking left the default stream untouched


def test_mla_te_probe_and_router_gemm(world):
    import megatron.core.transformer.multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils

    assert _original("megatron.core.transformer.multi_latent_attention.HAVE_TE") is True
    with pytest.raises(TypeError):
        isinstance(object(), mla.TELinear)  # a MagicMock, not a class: upstream would raise here
    assert mla.HAVE_TE is False
    assert _original("megatron.core.transformer.moe.moe_utils.te_general_gemm") is compat_cpu._MISSING
    x = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    torch.testing.assert_close(out, x @ w.T)
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.detach().reshape(-1, 8).sum(0).expand(4, 8))


def test_alltoall_split_sizes_become_numpy(world):
    from megatron.core.transformer.moe import token_dispatcher

    splits = torch.tensor([3, 1])
    upstream = _original("megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu")
    assert torch.is_tensor(upstream(splits, as_numpy=True))
    assert token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True).tolist() == [3, 1]


def test_grad_norm_and_clip_without_cuda(world):
    from megatron.core.optimizer import clip_grads

    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    with pytest.raises(Exception):
        _original("megatron.core.optimizer.clip_grads.get_grad_norm_fp32")(grads)
    norm = clip_grads.get_grad_norm_fp32(grads)
    want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    assert math.isclose(norm, want, rel_tol=1e-6)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=norm)
    assert math.isclose(clip_grads.get_grad_norm_fp32([p.grad for p in params]), 0.5, rel_tol=1e-5)


def test_local_spec_gaps_are_filled_by_the_spec(world):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from r1_megatron.model.attention import RMSNorm
    from r1_megatron.model.config import transformer_config

    cfg = transformer_config(CARD)
    with pytest.raises(TypeError, match="k_channels"):
        DotProductAttention(cfg, 1, AttnMaskType.causal, "self", k_channels=32, v_channels=16)
    sp_cfg = replace(cfg, tensor_model_parallel_size=2, sequence_parallel=True)
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(sp_cfg, 64)
    norm = RMSNorm(sp_cfg, 64, eps=1e-6)
    assert norm.weight.sequence_parallel is True
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)


def test_sdpa_attention_matches_naive_softmax_attention(world):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from r1_megatron.model.attention import SDPAttention
    from r1_megatron.model.config import transformer_config

    attn = SDPAttention(transformer_config(CARD), 1, AttnMaskType.causal, softmax_scale=0.3)
    s, b, heads, groups, dk, dv = 7, 2, 4, 2, 12, 5
    q, k, v = torch.randn(s, b, heads, dk), torch.randn(s, b, groups, dk), torch.randn(s, b, groups, dv)

    def naive(q, k, v):  # [s, h, d] one sequence, causal, GQA by repetition
        k, v = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * 0.3
        scores = scores.masked_fill(torch.ones(len(q), len(q)).triu(1).bool(), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(len(q), -1)

    out = attn(q, k, v, None)
    for i in range(b):
        torch.testing.assert_close(out[:, i], naive(q[:, i], k[:, i], v[:, i]))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=4, max_seqlen_kv=4
    )
    out = attn(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=packed)
    for lo, hi in ((0, 3), (3, 7)):
        torch.testing.assert_close(out[lo:hi], naive(q[lo:hi, 0], k[lo:hi, 0], v[lo:hi, 0]))
    # An empty sequence and row padding past cu_seqlens[-1] (its own sequence), as pack() can leave.
    cu = torch.tensor([0, 3, 3, 6], dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=3, max_seqlen_kv=3
    )
    out = attn(q[:, 1], k[:, 1], v[:, 1], None, packed_seq_params=packed)
    for lo, hi in ((0, 3), (3, 6), (6, 7)):
        torch.testing.assert_close(out[lo:hi], naive(q[lo:hi, 1], k[lo:hi, 1], v[lo:hi, 1]))


def _loss_func(output):
    return output.sum(), {"loss": output.sum().detach()}


def _train_step(model, tokens):
    """One forward/backward through megatron's schedule; returns the summed token loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch, position_ids, None, labels=batch), _loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
    )
    return losses[0]["loss"].item() if losses else None


def test_single_rank_training_step_through_megatron_schedule(world):
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics
    from megatron.core.transformer.moe.router import TopKRouter

    assert hasattr(_original("TopKRouter._apply_expert_bias"), "_torchdynamo_orig_callable")
    assert not hasattr(TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable")
    torch.manual_seed(0)
    model = build_model(CARD)
    loss = _train_step(model, TOKENS)
    assert math.isfinite(loss)
    router = model.decoder.layers[1].mlp.router
    assert router.local_tokens_per_expert.sum().item() == TOKENS.numel() * CARD.router_topk
    assert model.decoder.layers[1].mlp.router.weight.grad.abs().sum() > 0
    track_moe_metrics(1.0, 0, force_initialize=True, track_names=["seq_load_balancing_loss"], num_layers=2)


# ---------------------------------------------------------------------------- two ranks


def _two_rank_worker(rank: int, store_path: str, ckpt: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from r1_megatron.checkpoint.mcore_io import load_mcore_into
    from r1_megatron.parallel.device import seed_all

    torch.set_num_threads(1)
    compat_cpu.activate()
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    results = {}
    for name, layout in {
        "tp2_sp_ep2": ParallelConfig(tp=2, ep=2, sequence_parallel=True, dispatcher="alltoall"),
        "pp2": ParallelConfig(pp=2),
    }.items():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp,
        )
        seed_all(0)
        model = build_model(CARD, layout)
        load_mcore_into(model, ckpt)
        results[name] = _train_step(model, TOKENS)
        parallel_state.destroy_model_parallel()
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_tp_sp_ep_and_pp_match_single_rank(world, tmp_path):
    from r1_megatron.checkpoint.mcore_io import save_mcore

    # upstream moves the stage-shared embedding with .cuda(); PP2 with MTP below goes through the fix
    assert ".cuda()" in inspect.getsource(_original("LanguageModule.setup_embeddings_and_output_layer"))
    torch.manual_seed(1)
    model = build_model(CARD)
    save_mcore(model, CARD, tmp_path / "ckpt")
    reference = _train_step(model, TOKENS)
    store = tempfile.mkstemp(prefix="r1m_compat_")[1]
    torch.multiprocessing.start_processes(
        _two_rank_worker, args=(store, str(tmp_path / "ckpt"), str(tmp_path / "out")), nprocs=2,
        start_method="spawn",
    )
    results = [torch.load(Path(f"{tmp_path / 'out'}.{r}")) for r in range(2)]
    for r in range(2):  # TP ranks both hold the loss
        assert math.isclose(results[r]["tp2_sp_ep2"], reference, rel_tol=1e-5)
    assert math.isclose(results[1]["pp2"], reference, rel_tol=1e-5)  # the last stage holds it
    assert results[0]["pp2"] is None

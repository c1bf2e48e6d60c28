"""The trainer's CPU fixes in compat_cpu.py (its "Parallel-training additions" section) are needed and work.

For each: the upstream behaviour it works around is asserted to still exist (the test fails when
megatron-core changes under the patch), and the patched path is exercised.
- DDP's grad buffers (param_and_grad_buffer) and FP32Optimizer's loss scale ask for CUDA: with
  upstream's own `torch` they raise on this machine; patched, megatron DDP + optimizer build and step
  on CPU.
- MLA's local-spec down-projections (ColumnParallelLinear, output columns gathered afterwards) lose
  the other TP ranks' share of the shared rope key's gradient; the fix runs them at full width on the
  sequence shard. Here: upstream still takes that path, and the replacement forward equals the
  upstream forward; the gradient itself is checked at TP 2 against world 1 in
  tests/dist/test_split_invariance.py (all TP layouts).
"""

import contextlib
import inspect
import sys

import pytest
import torch

from r1_megatron.config.loader import load_card
from r1_megatron.parallel import compat_cpu
from r1_megatron.parallel.device import single_rank_world

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path test")
CARD = load_card("micro_moe")


@pytest.fixture(scope="module")
def world():
    return single_rank_world(0, device=torch.device("cpu"))


@contextlib.contextmanager
def upstream_torch(module_name: str):
    """Run with the module's own `torch` (what activate() replaced), then put the proxy back."""
    module = sys.modules[module_name]
    proxy = module.torch
    module.torch = compat_cpu.REPLACED[f"{module_name}.torch"]
    try:
        yield
    finally:
        module.torch = proxy


def _ddp(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return DistributedDataParallel(model.config, ddp_config, model)


def _model():
    from r1_megatron.model.provider import build_model

    return build_model(CARD)


def test_ddp_grad_buffers_need_cuda_upstream_and_build_on_cpu_patched(world):
    name = "megatron.core.distributed.param_and_grad_buffer"
    assert name in compat_cpu.CUDA_DEVICE_MODULES
    with upstream_torch(name), pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        _ddp(_model())
    ddp = _ddp(_model())
    assert all(buf.grad_data.device.type == "cpu" for buf in ddp.buffers + ddp.expert_parallel_buffers)


def test_fp32_optimizer_needs_cuda_upstream_and_steps_on_cpu_patched(world):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    name = "megatron.core.optimizer.optimizer"
    assert name in compat_cpu.CUDA_DEVICE_MODULES
    ddp = _ddp(_model())
    config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0)
    with upstream_torch(name), pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        get_megatron_optimizer(config, [ddp])
    optimizer = get_megatron_optimizer(config, [ddp])
    before = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    for p in ddp.module.parameters():
        p.main_grad.fill_(0.01)
    ok, grad_norm, _ = optimizer.step()
    assert ok and grad_norm > 0
    moved = [n for n, p in ddp.module.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)


def test_mla_down_projections_upstream_path_still_drops_rope_key_grads(world):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from r1_megatron.model.config import transformer_config

    source = inspect.getsource(MLASelfAttention.get_query_key_value_tensors)
    # Column-parallel output gathered by an op whose backward keeps this rank's columns only.
    assert "kv_combined = gather_from_tensor_model_parallel_region(kv_combined)" in source
    config = transformer_config(CARD)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    attention = spec.layer_specs[0].submodules.self_attention.submodules
    assert attention.linear_kv_down_proj is ColumnParallelLinear
    assert attention.linear_q_down_proj is ColumnParallelLinear
    assert MLASelfAttention.__init__.__wrapped__ is compat_cpu.REPLACED["MLASelfAttention.__init__"]


def test_full_width_down_projection_equals_upstream_forward(world):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from r1_megatron.model.config import transformer_config

    config = transformer_config(CARD)
    layer = ColumnParallelLinear(64, 48, config=config, init_method=torch.nn.init.normal_, bias=False,
                                 gather_output=False)
    x = torch.randn(7, 2, 64, requires_grad=True)
    want, _ = layer(x)
    got, bias = compat_cpu._down_proj_forward(layer, x)
    assert bias is None and torch.allclose(got, want, atol=1e-6, rtol=0)
    got.sum().backward()
    assert torch.allclose(layer.weight.grad if layer.weight.grad is not None else layer.weight.main_grad,
                          x.detach().sum(dim=(0, 1)).expand(48, 64), atol=1e-4)
    # At tp 1 (no sequence parallelism) the model keeps upstream's forward.
    model = _model()
    attn = model.decoder.layers[0].self_attention
    assert "forward" not in vars(attn.linear_kv_down_proj)

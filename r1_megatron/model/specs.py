"""Layer specs: megatron-core's own GPT specs, with a few modules substituted.

- Every MoE layer routes with DeepSeekV3Router (router.py) instead of megatron's TopKRouter.
- CPU / local spec: megatron's local DotProductAttention cannot take MLA's k/v head dims and its
  torch norm refuses sequence parallelism, so they become SDPAttention and RMSNorm (attention.py);
  MLA becomes PositionedMLA, which adds shared-prefix rope positions (rl.share_prompts).
- GPU spec: megatron's transformer-engine spec as is (fused layernorm+linear, TE attention, grouped
  GEMM experts); only the router changes.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from r1_megatron.config.schema import ModelConfig
from r1_megatron.model.attention import PositionedMLA, RMSNorm, SDPAttention
from r1_megatron.model.router import DeepSeekV3Router

# Local-spec modules that cannot run our models, and what replaces them. PositionedMLA is MLA with
# shared-prefix rope positions (attention.py; rl.share_prompts), identical otherwise.
LOCAL_SUBSTITUTES: dict[type, type] = {
    DotProductAttention: SDPAttention, WrappedTorchNorm: RMSNorm, MLASelfAttention: PositionedMLA,
}


def _substitute(node, table: dict, seen: set[int]):
    """Replace module classes in a spec tree in place (specs are plain dataclasses and ModuleSpecs)."""
    if isinstance(node, type):
        return table.get(node, node)
    if id(node) in seen:
        return node
    seen.add(id(node))
    if isinstance(node, ModuleSpec):
        node.module = table.get(node.module, node.module)
        if node.submodules is not None:
            node.submodules = _substitute(node.submodules, table, seen)
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            setattr(node, f.name, _substitute(getattr(node, f.name), table, seen))
    elif isinstance(node, list):
        node[:] = [_substitute(x, table, seen) for x in node]
    return node


def _use_deepseek_router(block: TransformerBlockSubmodules, m: ModelConfig) -> None:
    if not m.num_experts or m.score_function != "sigmoid":
        return
    router = functools.partial(DeepSeekV3Router, norm_topk_prob=m.norm_topk_prob)
    for layer in block.layer_specs:
        mlp = layer.submodules.mlp
        if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
            mlp.submodules.router = router


def decoder_block_spec(
    cfg: TransformerConfig, m: ModelConfig, gpu: bool, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """Specs for the decoder layers this pipeline stage builds (+ the final norm)."""
    block = get_gpt_decoder_block_spec(
        cfg, use_transformer_engine=gpu, normalization="RMSNorm", vp_stage=vp_stage
    )
    if not gpu:
        block = _substitute(block, LOCAL_SUBSTITUTES, set())
    _use_deepseek_router(block, m)
    return block


def mtp_block_spec(cfg: TransformerConfig, m: ModelConfig, gpu: bool, vp_stage: int | None = None):
    """The MTP block spec (None without MTP or when this stage holds no MTP layer).

    Built from the full layer list, so the MTP layer copies the last decoder layer (MoE) even on
    a pipeline stage that holds no MoE layer."""
    if not m.mtp_num_layers:
        return None
    full = get_gpt_decoder_block_spec(cfg, use_transformer_engine=gpu, normalization="RMSNorm")
    spec = get_gpt_mtp_block_spec(cfg, full.layer_specs[-1], use_transformer_engine=gpu, vp_stage=vp_stage)
    if spec is None:
        return None
    if not gpu:
        spec = _substitute(spec, LOCAL_SUBSTITUTES, set())
    for layer in spec.layer_specs:
        _use_deepseek_router(TransformerBlockSubmodules(layer_specs=[layer.submodules.transformer_layer]), m)
    return spec

"""Model card (ModelConfig) -> megatron-core TransformerConfig / MLATransformerConfig.

The card says what the network is; the optional ParallelConfig says how megatron splits it (megatron
keeps both in one config object, so they meet here and nowhere else). `gpu` picks the production
flags (fusions, grouped GEMM); the CPU flags avoid every CUDA-only kernel (docs/cpu_platform.md).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from r1_megatron.config.schema import ModelConfig, ParallelConfig


def moe_layer_pattern(m: ModelConfig) -> list[int]:
    """1 for an MoE layer, 0 for a dense one: the first `first_k_dense` layers are dense."""
    if not m.num_experts:
        return [0] * m.num_layers
    return [0] * m.first_k_dense + [1] * (m.num_layers - m.first_k_dense)


def _device_flags(gpu: bool) -> dict:
    """Kernel choices. On CPU every fused/CUDA-only path is off; on GPU they are the fast ones."""
    return dict(
        use_cpu_initialization=not gpu,
        gradient_accumulation_fusion=gpu,
        persist_layer_norm=gpu,
        bias_activation_fusion=gpu,
        bias_dropout_fusion=gpu,
        masked_softmax_fusion=gpu,
        apply_rope_fusion=gpu,
        cross_entropy_loss_fusion=gpu,
        moe_grouped_gemm=gpu,
        moe_permute_fusion=gpu,
    )


def _parallel_flags(p: ParallelConfig | None, dtype: torch.dtype) -> dict:
    if p is None:
        return {}
    return dict(
        pipeline_dtype=dtype,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        sequence_parallel=p.sequence_parallel,
        moe_token_dispatcher_type=p.dispatcher,
    )


def _moe_flags(m: ModelConfig) -> dict:
    if not m.num_experts:
        return {}
    grouped = m.n_group > 1
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=(m.moe_ffn_hidden_size * m.num_shared_experts) or None,
        moe_router_topk=m.router_topk,
        moe_router_num_groups=m.n_group if grouped else None,
        moe_router_group_topk=m.topk_group if grouped else None,
        moe_router_score_function=m.score_function,
        moe_router_topk_scaling_factor=m.routed_scaling_factor,
        moe_router_pre_softmax=m.score_function == "softmax",
        moe_router_enable_expert_bias=m.bias_update_rate > 0,
        moe_router_bias_update_rate=m.bias_update_rate,
        moe_router_load_balancing_type="seq_aux_loss" if m.seq_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.seq_aux_loss_coeff,
        # HF computes router logits in fp32; so do we (the GPU default would be the input dtype).
        moe_router_dtype="fp32",
        moe_layer_freq=moe_layer_pattern(m),
        moe_token_dispatcher_type="alltoall",
    )


def transformer_config(
    m: ModelConfig,
    parallel: ParallelConfig | None = None,
    *,
    gpu: bool = False,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """The megatron config for card `m`. `overrides` are raw TransformerConfig fields (e.g.
    recompute_granularity) applied last."""
    common = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        mtp_num_layers=m.mtp_num_layers or None,
        mtp_loss_scaling_factor=m.mtp_loss_scale,
        **_device_flags(gpu),
        **_moe_flags(m),
    )
    common.update(_parallel_flags(parallel, dtype))
    if m.arch == "deepseek_v3":
        # megatron's fused MLA rope is YaRN-only, training-only and marked experimental: keep it off.
        common["apply_rope_fusion"] = False
        cfg = MLATransformerConfig(
            **common,
            multi_latent_attention=True,
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_head_dim=m.qk_nope_head_dim,
            qk_pos_emb_head_dim=m.qk_rope_head_dim,
            v_head_dim=m.v_head_dim,
            # q_a_layernorm / kv_a_layernorm
            qk_layernorm=True,
            rope_type="yarn" if m.yarn_factor else "rope",
            rotary_base=m.rope_theta,
            rotary_scaling_factor=m.yarn_factor or 1.0,
            original_max_position_embeddings=m.original_max_position,
            beta_fast=m.beta_fast,
            beta_slow=m.beta_slow,
            mscale=m.mscale,
            mscale_all_dim=m.mscale_all_dim,
        )
    else:
        cfg = TransformerConfig(
            **common,
            num_query_groups=m.num_key_value_heads or m.num_attention_heads,
            kv_channels=m.hidden_size // m.num_attention_heads,
            add_qkv_bias=m.qkv_bias,
        )
    return dataclasses.replace(cfg, **overrides) if overrides else cfg

"""Parameter counts from a model card, module by module, with the shapes of the published checkpoints.

Every weight is listed under its Hugging Face name with its element count and the way megatron-core
shards it (`Weight.shard`):
- "tp": split over tensor parallel (column/row-parallel linears, vocab-parallel embedding and head);
- "replicated": a full copy on every TP rank (norms, the router, and MLA's q_a_proj/kv_a_proj, which the
  transformer-engine spec builds as `parallel_mode="duplicated"`; the local spec splits them instead);
- "expert": one routed expert, placed by expert parallel and split over expert tensor parallel.

The MTP question (DeepSeek-V3 technical report arXiv:2412.19437 §2.2; HF model card "685B = 671B main
+ 14B MTP"): the MTP module shares the embedding and output head with the main model, but the published
checkpoint stores copies of both under `model.layers.61.{embed_tokens,shared_head.head}`. Counting those
copies gives 13.5B for MTP and 684.5B in all, which is what the published 685B counts. Without them MTP
is 11.6B (682.6B in all). `ParamCount` reports both.

"Activated per token" counts every weight a token touches: embedding row, attention, the dense MLPs,
the shared experts, the router, router_topk routed experts per MoE layer and the output head
(MTP excluded, as in the report's 37B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from r1_megatron.config.schema import ModelConfig

Shard = Literal["tp", "replicated", "expert"]


@dataclass(frozen=True)
class Weight:
    """One weight tensor of one layer: HF name, element count (of one expert for "expert"), sharding.

    `trainable` is False for buffers the optimizer does not touch (the router's expert bias, which the
    aux-loss-free rule updates). `copies` is the number of routed experts the entry stands for.
    """

    name: str
    numel: int
    shard: Shard = "tp"
    trainable: bool = True
    copies: int = 1

    @property
    def total(self) -> int:
        return self.numel * self.copies


def _mla_attention(m: ModelConfig) -> list[Weight]:
    h, n = m.hidden_size, m.num_attention_heads
    qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    out: list[Weight] = []
    if m.q_lora_rank:
        out += [
            Weight("self_attn.q_a_proj", h * m.q_lora_rank, "replicated"),
            Weight("self_attn.q_a_layernorm", m.q_lora_rank, "replicated"),
            Weight("self_attn.q_b_proj", m.q_lora_rank * n * qk_head),
        ]
    else:
        out.append(Weight("self_attn.q_proj", h * n * qk_head))
    return out + [
        # kv_a_proj_with_mqa yields the compressed kv (kv_lora_rank) plus the shared rope key k_pe.
        Weight("self_attn.kv_a_proj_with_mqa", h * (m.kv_lora_rank + m.qk_rope_head_dim), "replicated"),
        Weight("self_attn.kv_a_layernorm", m.kv_lora_rank, "replicated"),
        Weight("self_attn.kv_b_proj", m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)),
        Weight("self_attn.o_proj", n * m.v_head_dim * h),
    ]


def _gqa_attention(m: ModelConfig) -> list[Weight]:
    h, n = m.hidden_size, m.num_attention_heads
    head_dim = h // n
    kv = (m.num_key_value_heads or n) * head_dim
    out = [
        Weight("self_attn.q_proj", h * h),
        Weight("self_attn.k_proj", h * kv),
        Weight("self_attn.v_proj", h * kv),
        Weight("self_attn.o_proj", h * h),
    ]
    if m.qkv_bias:
        out += [
            Weight("self_attn.q_proj.bias", h),
            Weight("self_attn.k_proj.bias", kv),
            Weight("self_attn.v_proj.bias", kv),
        ]
    return out


def attention_weights(m: ModelConfig) -> list[Weight]:
    return _mla_attention(m) if m.arch == "deepseek_v3" else _gqa_attention(m)


def _swiglu(prefix: str, h: int, f: int, shard: Shard = "tp", copies: int = 1) -> list[Weight]:
    return [
        Weight(f"{prefix}.{p}", h * f, shard, copies=copies) for p in ("gate_proj", "up_proj", "down_proj")
    ]


def mlp_weights(m: ModelConfig, moe: bool) -> list[Weight]:
    h = m.hidden_size
    if not moe:
        return _swiglu("mlp", h, m.ffn_hidden_size)
    out = [
        Weight("mlp.gate.weight", m.num_experts * h, "replicated"),
        Weight("mlp.gate.e_score_correction_bias", m.num_experts, "replicated", trainable=False),
    ]
    if m.num_shared_experts:
        out += _swiglu("mlp.shared_experts", h, m.moe_ffn_hidden_size * m.num_shared_experts)
    return out + _swiglu("mlp.experts", h, m.moe_ffn_hidden_size, "expert", m.num_experts)


def is_moe_layer(m: ModelConfig, layer: int) -> bool:
    """Layer index counts MTP layers after the main ones (HF: model.layers.{num_layers + k})."""
    return m.num_experts > 0 and layer >= m.first_k_dense


def layer_weights(m: ModelConfig, layer: int) -> list[Weight]:
    h = m.hidden_size
    norms = [Weight("input_layernorm", h, "replicated"), Weight("post_attention_layernorm", h, "replicated")]
    return attention_weights(m) + norms + mlp_weights(m, is_moe_layer(m, layer))


def embedding_weight(m: ModelConfig) -> Weight:
    return Weight("embed_tokens", m.vocab_size * m.hidden_size)


def head_weights(m: ModelConfig) -> list[Weight]:
    """Final norm and output head (none when tied: the embedding is the head)."""
    out = [Weight("norm", m.hidden_size, "replicated")]
    if not m.tie_embeddings:
        out.append(Weight("lm_head", m.vocab_size * m.hidden_size))
    return out


def mtp_own_weights(m: ModelConfig, k: int) -> list[Weight]:
    """MTP module k without its shared embedding/head: enorm, hnorm, eh_proj (2H -> H), one transformer
    layer and shared_head.norm."""
    h = m.hidden_size
    return [
        Weight("enorm", h, "replicated"),
        Weight("hnorm", h, "replicated"),
        Weight("eh_proj", 2 * h * h),
        Weight("shared_head.norm", h, "replicated"),
    ] + layer_weights(m, m.num_layers + k)


def _sum(weights: list[Weight]) -> int:
    return sum(w.total for w in weights)


def _active(weights: list[Weight], topk: int) -> int:
    return sum(w.numel * (topk if w.shard == "expert" else w.copies) for w in weights)


@dataclass(frozen=True)
class ParamCount:
    """Whole-model counts (elements, not bytes)."""

    total: int  # main model: embedding, num_layers layers, final norm, head
    mtp_own: int  # MTP modules without the embedding/head copies
    mtp_with_copies: int  # MTP as stored in the HF checkpoint (with embed_tokens + shared_head.head)
    active_per_token: int  # weights one token touches in the main model

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp_with_copies


def count_params(m: ModelConfig) -> ParamCount:
    layers = [layer_weights(m, i) for i in range(m.num_layers)]
    emb, head = embedding_weight(m), head_weights(m)
    total = emb.total + sum(_sum(ws) for ws in layers) + _sum(head)
    mtp_own = sum(_sum(mtp_own_weights(m, k)) for k in range(m.mtp_num_layers))
    copies = m.mtp_num_layers * 2 * m.vocab_size * m.hidden_size
    active = emb.total + sum(_active(ws, m.router_topk) for ws in layers) + _sum(head)
    return ParamCount(total=total, mtp_own=mtp_own, mtp_with_copies=mtp_own + copies, active_per_token=active)

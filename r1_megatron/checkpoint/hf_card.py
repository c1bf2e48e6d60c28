"""Which model-card fields an HF config.json must agree on, and the card merged over an HF config
(for the fields HF does not store: bias update rate, aux-loss and MTP loss coefficients)."""

from __future__ import annotations

import dataclasses

from r1_megatron.checkpoint.hf import ConversionError
from r1_megatron.config.loader import load_card
from r1_megatron.config.schema import ModelConfig

_COMMON = ("arch", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "vocab_size",
           "rms_norm_eps", "rope_theta", "tie_embeddings", "max_position_embeddings")
_MOE = ("first_k_dense", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "moe_ffn_hidden_size", "num_experts", "num_shared_experts", "router_topk", "n_group", "topk_group",
        "routed_scaling_factor", "norm_topk_prob", "mtp_num_layers", "yarn_factor")
_YARN = ("original_max_position", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def architecture(m: ModelConfig) -> dict:
    """The fields that config.json and a model card must agree on."""
    names = _COMMON + (_MOE + (_YARN if m.yarn_factor else ()) if m.arch == "deepseek_v3" else ("qkv_bias",))
    out = {name: getattr(m, name) for name in names}
    if m.arch != "deepseek_v3":
        out["num_key_value_heads"] = m.num_key_value_heads or m.num_attention_heads
    return out


def merge_card(from_hf: ModelConfig, card_name: str | None) -> ModelConfig:
    """The card (for the fields HF does not store), after checking it describes the same network."""
    if not card_name:
        return from_hf
    card = load_card(card_name)
    ours, theirs = architecture(card), architecture(from_hf)
    for name in dict.fromkeys([*theirs, *ours]):
        if ours.get(name) != theirs.get(name):
            raise ConversionError(
                f"model card '{card_name}' has {name}={ours.get(name)!r} "
                f"but config.json has {theirs.get(name)!r}"
            )
    return dataclasses.replace(card, bos_token_id=from_hf.bos_token_id, eos_token_id=from_hf.eos_token_id)

"""The ONE megatron-core <-> Hugging Face name table (docs/hf_format.md), plus the fused-weight splits.

Export (mcore -> HF), import (HF -> mcore), the converter CLI and the rollout refit all read the rules
below. A rule maps one megatron parameter (pattern with {i}/{e} placeholders, relative to a layer when
it is a layer rule) to one or more HF tensors; `kind` says how fused megatron weights split:

  copy     one tensor, same layout
  gate_up  megatron linear_fc1 [2f, h] = [gate_proj; up_proj] (per TP shard)
  qkv      megatron linear_qkv [ng*(q+2)*d, h] interleaved per query group = q_proj/k_proj/v_proj

Layer prefixes: `decoder.layers.{i}.` <-> `model.layers.{i}.`, and the MTP layer k
`mtp.layers.{k}.transformer_layer.` <-> `model.layers.{num_layers + k}.` (published DeepSeek-V3
layout). The MTP head norms/projection have their own rules; HF also stores the MTP layer's
`embed_tokens` and `shared_head.head`, which megatron shares with the main model (checked equal on
import, written as copies on export). Both the local-spec names and the transformer-engine names
(layernorm fused into the following linear as `layer_norm_weight`, grouped experts as
`experts.linear_fc1.weight{e}`) are listed; a model has one of them.

An unknown name, on either side, is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from r1_megatron.config.schema import ModelConfig


class ConversionError(ValueError):
    """A checkpoint does not match the model: names the key (and shapes / config fields)."""


@dataclass(frozen=True)
class Rule:
    mcore: str  # megatron name pattern
    hf: tuple[str, ...]  # HF name pattern(s), in split order
    kind: str = "copy"  # copy | gate_up | qkv


def _mlp(mc: str, hf: str) -> list[Rule]:
    return [
        Rule(f"{mc}.linear_fc1.weight", (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"), "gate_up"),
        Rule(f"{mc}.linear_fc2.weight", (f"{hf}.down_proj.weight",)),
    ]


# Inside one transformer layer (decoder or MTP), DeepSeek-V3.
DEEPSEEK_LAYER_RULES: list[Rule] = [
    Rule("input_layernorm.weight", ("input_layernorm.weight",)),
    Rule("self_attention.linear_q_proj.weight", ("self_attn.q_proj.weight",)),
    Rule("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",)),
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",)),
    Rule("self_attention.linear_q_up_proj.layer_norm_weight", ("self_attn.q_a_layernorm.weight",)),
    Rule("self_attention.linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",)),
    Rule("self_attention.linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",)),
    Rule("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",)),
    Rule("self_attention.linear_kv_up_proj.layer_norm_weight", ("self_attn.kv_a_layernorm.weight",)),
    Rule("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",)),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    Rule("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
    *_mlp("mlp", "mlp"),
    Rule("mlp.router.weight", ("mlp.gate.weight",)),
    Rule("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",)),
    *_mlp("mlp.experts.local_experts.{e}", "mlp.experts.{e}"),
    Rule(
        "mlp.experts.linear_fc1.weight{e}",
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
        "gate_up",
    ),
    Rule("mlp.experts.linear_fc2.weight{e}", ("mlp.experts.{e}.down_proj.weight",)),
    *_mlp("mlp.shared_experts", "mlp.shared_experts"),
]

# Inside one transformer layer, Qwen2 / Llama students.
DENSE_LAYER_RULES: list[Rule] = [
    Rule("input_layernorm.weight", ("input_layernorm.weight",)),
    Rule("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
    Rule("self_attention.linear_qkv.weight", tuple(f"self_attn.{x}_proj.weight" for x in "qkv"), "qkv"),
    Rule("self_attention.linear_qkv.bias", tuple(f"self_attn.{x}_proj.bias" for x in "qkv"), "qkv"),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    Rule("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
    *_mlp("mlp", "mlp"),
]

# Outside the layers (HF names may use {L} = num_layers + k for the MTP layer k).
GLOBAL_RULES: list[Rule] = [
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
    Rule("mtp.layers.{k}.enorm.weight", ("model.layers.{L}.enorm.weight",)),
    Rule("mtp.layers.{k}.hnorm.weight", ("model.layers.{L}.hnorm.weight",)),
    Rule("mtp.layers.{k}.eh_proj.weight", ("model.layers.{L}.eh_proj.weight",)),
    Rule("mtp.layers.{k}.final_layernorm.weight", ("model.layers.{L}.shared_head.norm.weight",)),
]

# HF tensors of the MTP layer that megatron shares with the main model: HF pattern -> HF source.
MTP_SHARED = {
    "model.layers.{L}.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.{L}.shared_head.head.weight": "lm_head.weight",
}

LAYER_PREFIXES = (
    ("decoder.layers.{i}.", "model.layers.{i}."),
    ("mtp.layers.{k}.transformer_layer.", "model.layers.{L}."),
)

# megatron state-dict entries that carry no weights.
SKIPPED_SUFFIXES = ("_extra_state",)


def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    out = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", out)
    return re.compile(out + "$")


def _compiled_rules(cfg: ModelConfig) -> list[tuple[re.Pattern, Rule]]:
    layer_rules = DEEPSEEK_LAYER_RULES if cfg.arch == "deepseek_v3" else DENSE_LAYER_RULES
    rules = [(_regex(r.mcore), r) for r in GLOBAL_RULES]
    for mc_prefix, hf_prefix in LAYER_PREFIXES:
        for r in layer_rules:
            full = Rule(mc_prefix + r.mcore, tuple(hf_prefix + h for h in r.hf), r.kind)
            rules.append((_regex(full.mcore), full))
    return rules


_CACHE: dict[str, list] = {}


def _rules(cfg: ModelConfig) -> list[tuple[re.Pattern, Rule]]:
    key = "deepseek_v3" if cfg.arch == "deepseek_v3" else "dense"
    if key not in _CACHE:
        _CACHE[key] = _compiled_rules(cfg)
    return _CACHE[key]


def hf_names(mcore_name: str, cfg: ModelConfig) -> tuple[tuple[str, ...], str]:
    """HF names (split order) and split kind for one megatron parameter name."""
    for regex, rule in _rules(cfg):
        match = regex.match(mcore_name)
        if match:
            fields = {k: int(v) for k, v in match.groupdict().items()}
            if "k" in fields:
                fields["L"] = cfg.num_layers + fields["k"]
            return tuple(h.format(**fields) for h in rule.hf), rule.kind
    raise ConversionError(f"no HF name for megatron parameter '{mcore_name}' (arch {cfg.arch})")


def mtp_shared_names(cfg: ModelConfig) -> dict[str, str]:
    """HF MTP-layer names that duplicate a main-model tensor: name -> the main-model name."""
    return {
        pat.format(L=cfg.num_layers + k): src
        for k in range(cfg.mtp_num_layers)
        for pat, src in MTP_SHARED.items()
    }


def _qkv_sizes(cfg: ModelConfig, rows: int) -> tuple[int, int, int]:
    """(query groups in this tensor, q rows per group, head dim) for a linear_qkv weight/bias shard."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    groups_total = cfg.num_key_value_heads or cfg.num_attention_heads
    q_per_group = cfg.num_attention_heads // groups_total
    groups = rows // ((q_per_group + 2) * head_dim)
    return groups, q_per_group * head_dim, head_dim


def split_fused(kind: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Split one megatron tensor (or one TP shard of it) into its HF parts, in rule order."""
    if kind == "copy":
        return [tensor]
    if kind == "gate_up":
        return list(torch.chunk(tensor, 2, dim=0))
    if kind == "qkv":
        groups, q_rows, d = _qkv_sizes(cfg, tensor.shape[0])
        per_group = tensor.reshape(groups, q_rows + 2 * d, *tensor.shape[1:])
        q, k, v = torch.split(per_group, [q_rows, d, d], dim=1)
        return [x.reshape(-1, *tensor.shape[1:]) for x in (q, k, v)]
    raise ValueError(f"unknown split kind {kind!r}")


def merge_fused(kind: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Inverse of split_fused."""
    if kind == "copy":
        return parts[0]
    if kind == "gate_up":
        return torch.cat(parts, dim=0)
    if kind == "qkv":
        q, k, v = parts
        d = cfg.hidden_size // cfg.num_attention_heads
        groups = k.shape[0] // d
        rest = q.shape[1:]
        grouped = [x.reshape(groups, -1, *rest) for x in (q, k, v)]
        return torch.cat(grouped, dim=1).reshape(-1, *rest)
    raise ValueError(f"unknown split kind {kind!r}")


def is_weight(mcore_name: str) -> bool:
    return not mcore_name.endswith(SKIPPED_SUFFIXES)


def export_weights(
    state: torch.nn.Module | dict[str, torch.Tensor], cfg: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) for every weight of a full (single-rank) megatron model or state dict.

    The MTP layer's shared embedding / head are yielded as copies after the main tensors."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict(keep_vars=False)
    emitted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not is_weight(name):
            continue
        names, kind = hf_names(name, cfg)
        for hf_name, part in zip(names, split_fused(kind, tensor.detach(), cfg), strict=True):
            if hf_name in MTP_SHARED.values():
                emitted[hf_name] = part
            yield hf_name, part
    if cfg.tie_embeddings:
        emitted.setdefault("lm_head.weight", emitted.get("model.embed_tokens.weight"))
    for hf_name, source in mtp_shared_names(cfg).items():
        if source not in emitted or emitted[source] is None:
            raise ConversionError(f"cannot write '{hf_name}': '{source}' is not on this rank")
        yield hf_name, emitted[source]


def import_weights(
    model: torch.nn.Module, get_hf: Callable[[str], torch.Tensor], cfg: ModelConfig, hf_keys: Iterable[str]
) -> None:
    """Fill `model` (single rank) from HF tensors; every HF key must be used, every shape must match."""
    hf_keys = set(hf_keys)
    used: set[str] = set()
    state = model.state_dict(keep_vars=True)
    for name, target in state.items():
        if not is_weight(name):
            continue
        names, kind = hf_names(name, cfg)
        missing = [n for n in names if n not in hf_keys]
        if missing:
            raise ConversionError(f"missing key '{missing[0]}' (for megatron '{name}')")
        parts = [get_hf(n) for n in names]
        value = merge_fused(kind, parts, cfg)
        if tuple(value.shape) != tuple(target.shape):
            shapes = " + ".join(f"'{n}' {tuple(p.shape)}" for n, p in zip(names, parts))
            raise ConversionError(f"shape mismatch: {shapes} but megatron '{name}' is {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        used.update(names)
    for hf_name, source in mtp_shared_names(cfg).items():
        if cfg.tie_embeddings and source == "lm_head.weight":
            source = "model.embed_tokens.weight"
        if hf_name not in hf_keys:
            raise ConversionError(f"missing key '{hf_name}' (the MTP layer's copy of '{source}')")
        if not torch.equal(get_hf(hf_name), get_hf(source)):
            raise ConversionError(f"'{hf_name}' differs from '{source}'; megatron's MTP shares that tensor")
        used.add(hf_name)
    if cfg.tie_embeddings and "lm_head.weight" in hf_keys:
        used.add("lm_head.weight")
    unknown = sorted(hf_keys - used)
    if unknown:
        raise ConversionError(f"unknown key '{unknown[0]}' in the HF checkpoint ({len(unknown)} unused keys)")


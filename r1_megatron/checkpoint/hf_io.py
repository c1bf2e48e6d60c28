"""Hugging Face directories on disk: safetensors shards + index, config.json <-> ModelConfig, tokenizer.

Shards are written as tensors stream in (bounded by `max_shard_bytes`), then renamed to the
`model-0000k-of-0000n.safetensors` names once n is known, with `model.safetensors.index.json` and
the integrity manifest (integrity.py).

Reading: `HFCheckpoint` opens files lazily, checks each file's safetensors header against its size
(and the manifest when the directory has one), and reads whole tensors or one even slice along a
dimension (a tensor-parallel shard). FP8 checkpoints (the published DeepSeek-V3/R1: e4m3 weights,
128x128 blocks, `<name>_scale_inv` holding one fp32 factor per block; config.json
`quantization_config.quant_method: fp8`) are dequantized on read as DeepSeek's fp8_cast_bf16 does:
the fp8 value times its block's factor, in fp32 (the caller casts to the model's dtype). A block at
the edge of a tensor whose size is not a multiple of the block size is partial.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1_megatron.checkpoint import integrity
from r1_megatron.checkpoint.hf import ConversionError
from r1_megatron.config.schema import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)
ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}


# ------------------------------------------------------------------------------------- config.json


def hf_config(m: ModelConfig) -> dict:
    """config.json for card `m`, in the published layout of each architecture."""
    cfg = {
        "architectures": [ARCHITECTURES[m.arch]],
        "model_type": m.arch,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads or m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": m.bos_token_id,
        "eos_token_id": m.eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if m.arch == "deepseek_v3":
        cfg.update(
            moe_intermediate_size=m.moe_ffn_hidden_size,
            n_routed_experts=m.num_experts,
            n_shared_experts=m.num_shared_experts,
            num_experts_per_tok=m.router_topk,
            n_group=m.n_group,
            topk_group=m.topk_group,
            routed_scaling_factor=m.routed_scaling_factor,
            norm_topk_prob=m.norm_topk_prob,
            first_k_dense_replace=m.first_k_dense,
            moe_layer_freq=1,
            topk_method="noaux_tc",
            scoring_func=m.score_function,
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_nope_head_dim,
            qk_rope_head_dim=m.qk_rope_head_dim,
            v_head_dim=m.v_head_dim,
            num_nextn_predict_layers=m.mtp_num_layers,
            attention_bias=False,
            attention_dropout=0.0,
        )
        if m.yarn_factor:
            cfg["rope_scaling"] = {
                "type": "yarn",
                "factor": m.yarn_factor,
                "original_max_position_embeddings": m.original_max_position,
                "beta_fast": m.beta_fast,
                "beta_slow": m.beta_slow,
                "mscale": m.mscale,
                "mscale_all_dim": m.mscale_all_dim,
            }
    else:
        cfg["attention_bias"] = m.qkv_bias
        if m.arch == "qwen2":
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
        else:
            cfg.update(mlp_bias=False, head_dim=m.hidden_size // m.num_attention_heads)
    return cfg


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, yarn dict or None) from either the legacy or the transformers-5 layout."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return float(theta), None
    if kind != "yarn":
        raise ConversionError(f"config.json: rope type '{kind}' is not supported (only default and yarn)")
    return float(theta), scaling


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig from an HF config.json dict (DeepseekV3 / Qwen2 / Llama)."""
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"config.json: model_type '{arch}' is not one of {sorted(ARCHITECTURES)}")
    theta, yarn = _rope(cfg)
    eos = cfg.get("eos_token_id")
    fields = dict(
        arch=arch,
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=cfg.get("initializer_range", 0.02),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )
    if arch == "deepseek_v3":
        scoring, method = cfg.get("scoring_func", "sigmoid"), cfg.get("topk_method", "noaux_tc")
        if (scoring, method) != ("sigmoid", "noaux_tc"):
            raise ConversionError(
                f"config.json: scoring_func {scoring!r} / topk_method {method!r} unsupported "
                "(only 'sigmoid' / 'noaux_tc')"
            )
        fields.update(
            first_k_dense=cfg.get("first_k_dense_replace", 0),
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            moe_ffn_hidden_size=cfg["moe_intermediate_size"],
            num_experts=cfg["n_routed_experts"],
            num_shared_experts=cfg.get("n_shared_experts") or 0,
            router_topk=cfg["num_experts_per_tok"],
            n_group=cfg.get("n_group") or 1,
            topk_group=cfg.get("topk_group") or 1,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            mtp_num_layers=cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0,
        )
        if yarn:
            fields.update(
                yarn_factor=float(yarn["factor"]),
                original_max_position=int(yarn["original_max_position_embeddings"]),
                beta_fast=float(yarn.get("beta_fast", 32.0)),
                beta_slow=float(yarn.get("beta_slow", 1.0)),
                mscale=float(yarn.get("mscale", 1.0)),
                mscale_all_dim=float(yarn.get("mscale_all_dim", 0.0)),
            )
    else:
        if arch == "llama" and cfg.get("attention_bias"):
            raise ConversionError("config.json: llama attention_bias (bias on o_proj too) is not supported")
        fields.update(
            first_k_dense=cfg["num_hidden_layers"],
            num_experts=0,
            mtp_num_layers=0,
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        )
    return ModelConfig(**fields)


def fp8_block(cfg: dict) -> tuple[int, int] | None:
    """The (rows, cols) block of an FP8-blockwise config.json, None when the weights are not quantized."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConversionError(
            f"config.json: quantization_config.quant_method {method!r} is not supported "
            "(only 'fp8' blockwise, dequantized on import)"
        )
    fmt, block = q.get("fmt", "e4m3"), q.get("weight_block_size")
    if fmt != "e4m3" or not (isinstance(block, list) and len(block) == 2 and all(int(b) > 0 for b in block)):
        raise ConversionError(
            f"config.json: quantization_config fmt {fmt!r} / weight_block_size {block!r} unsupported "
            "(only fmt 'e4m3' with [rows, cols] blocks)"
        )
    return int(block[0]), int(block[1])


def _read_json(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json")
    return json.loads(path.read_text())


def read_hf_config(hf_dir: str | Path) -> ModelConfig:
    raw = _read_json(hf_dir)
    fp8_block(raw)  # an unsupported quantization fails here, before any weight is read
    try:
        return model_config_from_hf(raw)
    except KeyError as e:
        raise ConversionError(f"{Path(hf_dir) / 'config.json'}: missing field {e.args[0]!r}") from e


# ------------------------------------------------------------------------------------- tensors


SCALE_SUFFIX = "_scale_inv"


class HFCheckpoint:
    """Lazy read access to the tensors of an HF directory (sharded or single-file safetensors).

    `verify` checks the directory's manifest, if it has one, on construction (this process alone);
    `bytes_read` and `names_read` count what was read, FP8 scales included."""

    def __init__(self, hf_dir: str | Path, verify: str = "full") -> None:
        self.dir = Path(hf_dir)
        integrity.verify(self.dir, verify, collective=False)
        index = self.dir / INDEX
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE).is_file():
            integrity.check_safetensors(self.dir / SINGLE)
            with safe_open(self.dir / SINGLE, "pt") as f:
                self.where = {k: SINGLE for k in f.keys()}
        else:
            raise ConversionError(f"{hf_dir}: neither {INDEX} nor {SINGLE} found")
        self.block = fp8_block(_read_json(self.dir)) if (self.dir / "config.json").is_file() else None
        self.scales = {k[: -len(SCALE_SUFFIX)]: k for k in self.where if k.endswith(SCALE_SUFFIX)}
        if self.scales and self.block is None:
            raise ConversionError(
                f"{self.dir}: '{next(iter(self.scales.values()))}' is an FP8 scale, but config.json has "
                "no fp8 quantization_config"
            )
        self._files: dict[str, object] = {}
        self.bytes_read = 0
        self.names_read: set[str] = set()

    def keys(self) -> list[str]:
        """The weight names (FP8 scales are part of their weight)."""
        return [k for k in self.where if not k.endswith(SCALE_SUFFIX)]

    def total_bytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in set(self.where.values()))

    def _slice(self, name: str):
        if name not in self.where:
            raise ConversionError(f"missing key '{name}' in {self.dir}")
        fname = self.where[name]
        if fname not in self._files:
            integrity.check_safetensors(self.dir / fname)
            self._files[fname] = safe_open(self.dir / fname, "pt")
        return self._files[fname].get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def _read(self, name: str, dim: int, start: int, length: int | None) -> torch.Tensor:
        sl = self._slice(name)
        if length is None:
            out = sl[:]
        else:
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, start + length)
            out = sl[tuple(index)]
        self.bytes_read += out.numel() * out.element_size()
        self.names_read.add(name)
        return out

    def read(self, name: str, dim: int = 0, start: int = 0, length: int | None = None) -> torch.Tensor:
        """The tensor `name`, or rows/cols [start, start + length) along `dim`; FP8 comes back fp32."""
        out = self._read(name, dim, start, length)
        if out.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return out
        if name not in self.scales or self.block is None:
            raise ConversionError(f"{self.dir}: '{name}' is {out.dtype} but has no '{name}{SCALE_SUFFIX}'")
        return self._dequantize(name, out, dim, start)

    def _dequantize(self, name: str, q: torch.Tensor, dim: int, start: int) -> torch.Tensor:
        shape, scale_shape = self.shape(name), self.shape(self.scales[name])
        if len(shape) != 2 or scale_shape != [math.ceil(n / b) for n, b in zip(shape, self.block)]:
            raise ConversionError(
                f"{self.dir}: '{self.scales[name]}' has shape {scale_shape}, which does not tile "
                f"'{name}' {shape} in {list(self.block)} blocks"
            )
        block = self.block[dim]
        first, last = start // block, math.ceil((start + q.shape[dim]) / block)
        scale = self._read(self.scales[name], dim, first, last - first).float()
        full = scale.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        full = full.narrow(dim, start - first * block, q.shape[dim]).narrow(1 - dim, 0, q.shape[1 - dim])
        return q.float() * full

    def __call__(self, name: str) -> torch.Tensor:
        return self.read(name)


def save_hf(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write shards + index + config.json (+ tokenizer files) into out_dir, one shard in memory at a time."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_keys: list[list[str]] = []
    shard_digests: list[dict] = []
    current: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    size = total = 0

    def flush() -> None:
        tmp = out / f".shard-{len(shard_keys)}.tmp"
        save_file(current, str(tmp), metadata={"format": "pt"})
        shard_digests.append(integrity.digest(tmp))  # right after writing: still in the page cache
        shard_keys.append(list(current))
        current.clear()

    for name, tensor in tensors:
        if name in seen:
            raise ConversionError(f"duplicate key '{name}' in export")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        # a contiguous copy: a split view would otherwise drag its whole base storage along
        current[name] = tensor.detach().to("cpu").contiguous().clone()
        size += nbytes
        total += nbytes
    flush()
    weight_map, files = {}, {}
    for k, keys in enumerate(shard_keys):
        fname = f"model-{k + 1:05d}-of-{len(shard_keys):05d}.safetensors"
        (out / f".shard-{k}.tmp").replace(out / fname)
        weight_map.update({name: fname for name in keys})
        files[fname] = shard_digests[k]
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copied = copy_tokenizer(tokenizer_dir, out)
    integrity.write_manifest(out, {**files, **integrity.digests(out, [INDEX, "config.json", *copied])})
    return out


def copy_tokenizer(src: str | Path | None, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in src (if any) into dst; returns the names copied."""
    if src is None or not Path(src).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file() and Path(src).resolve() != Path(dst).resolve():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


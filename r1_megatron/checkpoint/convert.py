"""`r1m convert`: HF <-> megatron checkpoints, on one process (gloo world of size 1).

  r1m convert hf-to-mcore --hf DIR --out DIR [--card NAME]
  r1m convert mcore-to-hf --ckpt DIR --out DIR [--tokenizer DIR] [--max-shard-mb N]

The HF side is the published DeepseekV3ForCausalLM (or Qwen2/Llama) layout; the name table is
checkpoint/hf.py. `--card` supplies the fields HF does not store (bias update rate, aux-loss and MTP
loss coefficients) and is checked against config.json on every architecture field.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from r1_megatron.checkpoint import hf, hf_io, mcore_io
from r1_megatron.config.loader import ConfigError, load_card
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


def _merge_card(from_hf: ModelConfig, card_name: str | None) -> ModelConfig:
    """The card (for the fields HF does not store), after checking it describes the same network."""
    if not card_name:
        return from_hf
    card = load_card(card_name)
    ours, theirs = architecture(card), architecture(from_hf)
    for name in dict.fromkeys([*theirs, *ours]):
        if ours.get(name) != theirs.get(name):
            raise hf.ConversionError(
                f"model card '{card_name}' has {name}={ours.get(name)!r} "
                f"but config.json has {theirs.get(name)!r}"
            )
    return dataclasses.replace(card, bos_token_id=from_hf.bos_token_id, eos_token_id=from_hf.eos_token_id)


def load_hf_model(hf_dir: str | Path, cfg: ModelConfig | None = None, device: torch.device | None = None):
    """Build a single-rank megatron model and fill it from an HF directory. Returns (model, cfg)."""
    from r1_megatron.model.provider import build_model
    from r1_megatron.parallel.device import single_rank_world

    cfg = cfg or hf_io.read_hf_config(hf_dir)
    device = single_rank_world(device=device)
    ckpt = hf_io.HFCheckpoint(hf_dir)
    model = build_model(cfg, device=device)
    hf.import_weights(model, ckpt, cfg, ckpt.keys())
    return model, cfg


def load_mcore_model(ckpt_dir: str | Path, device: torch.device | None = None):
    """Build a single-rank megatron model from its card and load the dist checkpoint. Returns (model, cfg)."""
    from r1_megatron.model.provider import build_model
    from r1_megatron.parallel.device import single_rank_world

    cfg = mcore_io.read_card(ckpt_dir)
    device = single_rank_world(device=device)
    model = build_model(cfg, device=device)
    mcore_io.load_mcore_into(model, ckpt_dir)
    return model, cfg


def load_any(path: str | Path, device: torch.device | None = None):
    """A megatron checkpoint written by r1m, or an HF directory (converted on the fly)."""
    if mcore_io.is_mcore_dir(path):
        return load_mcore_model(path, device)
    if (Path(path) / "config.json").is_file():
        return load_hf_model(path, device=device)
    raise hf.ConversionError(
        f"{path}: neither a megatron checkpoint ({mcore_io.CARD_FILE}) nor an HF directory (config.json)"
    )


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, card: str | None = None) -> Path:
    cfg = _merge_card(hf_io.read_hf_config(hf_dir), card)
    model, cfg = load_hf_model(hf_dir, cfg)
    out = mcore_io.save_mcore(model, cfg, out_dir)
    hf_io.copy_tokenizer(hf_dir, out)
    return out


def mcore_to_hf(
    ckpt_dir: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None, max_shard_mb: float = 2048
) -> Path:
    model, cfg = load_mcore_model(ckpt_dir)
    return hf_io.save_hf(
        out_dir,
        hf.export_weights(model, cfg),
        hf_io.hf_config(cfg),
        tokenizer_dir=tokenizer or ckpt_dir,
        max_shard_bytes=int(max_shard_mb * 1024**2),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1m convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--card", default=None, help="model card for the fields HF does not store")
    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF directory")
    b.add_argument("--ckpt", required=True, help="megatron checkpoint directory written by r1m")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--tokenizer", default=None, help="directory with tokenizer files (default: --ckpt)")
    b.add_argument("--max-shard-mb", type=float, default=2048, help="safetensors shard size (MiB)")
    args = parser.parse_args(argv)
    try:
        if args.direction == "hf-to-mcore":
            out = hf_to_mcore(args.hf, args.out, args.card)
        else:
            out = mcore_to_hf(args.ckpt, args.out, args.tokenizer, args.max_shard_mb)
    except (hf.ConversionError, ConfigError) as e:
        print(f"r1m convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

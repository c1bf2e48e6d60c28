"""Random-weight Hugging Face checkpoints for tests and benchmarks, made by transformers itself.

`make_hf_checkpoint(card, dir)` builds the transformers model for a card (DeepseekV3ForCausalLM,
Qwen2ForCausalLM or LlamaForCausalLM), gives every norm weight and the DeepSeek
`e_score_correction_bias` random values (transformers initializes them to constants, which would
hide a swapped mapping), saves it with `save_pretrained`, and appends the MTP layers in the
published DeepSeek-V3 layout (transformers' model does not build them; it ignores them on load).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from r1_megatron.checkpoint.hf_io import hf_config
from r1_megatron.config.schema import ModelConfig


def hf_model(m: ModelConfig, seed: int = 0, std: float | None = None) -> torch.nn.Module:
    """A transformers model for card `m` with randomized norms / expert biases, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = hf_config(m)
    if std is not None:
        cfg["initializer_range"] = std
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # spread comparable to the sigmoid scores, so the bias changes which experts win
                b.copy_(0.3 * torch.rand(b.shape, generator=gen))
    return model


def mtp_tensors(m: ModelConfig, main: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random MTP-layer tensors (HF names) for card `m`; the embedding / head copies equal `main`'s."""
    if not m.mtp_num_layers:
        return {}
    # The MTP transformer layer is shaped like the last decoder layer: take it from a saved model with
    # more layers (saved, so that the experts come out per expert as in the published layout).
    with tempfile.TemporaryDirectory() as tmp:
        hf_model(replace(m, num_layers=m.num_layers + m.mtp_num_layers), seed=seed + 7).save_pretrained(tmp)
        longer = {}
        for f in Path(tmp).glob("*.safetensors"):
            longer.update(load_file(f))
    gen = torch.Generator().manual_seed(seed + 11)
    out = {}
    for k in range(m.mtp_num_layers):
        prefix = f"model.layers.{m.num_layers + k}."
        out.update({name: t.clone() for name, t in longer.items() if name.startswith(prefix)})
        h = m.hidden_size
        out[prefix + "enorm.weight"] = 1.0 + 0.2 * torch.randn(h, generator=gen)
        out[prefix + "hnorm.weight"] = 1.0 + 0.2 * torch.randn(h, generator=gen)
        out[prefix + "eh_proj.weight"] = m.init_std * torch.randn(h, 2 * h, generator=gen)
        out[prefix + "shared_head.norm.weight"] = 1.0 + 0.2 * torch.randn(h, generator=gen)
        out[prefix + "embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
        head = main.get("lm_head.weight", main["model.embed_tokens.weight"])
        out[prefix + "shared_head.head.weight"] = head.clone()
    return out


def make_hf_checkpoint(
    m: ModelConfig, out_dir: str | Path, seed: int = 0, std: float | None = None
) -> torch.nn.Module:
    """Save a random transformers model for `m` (plus MTP layers) to out_dir; returns the model.
    `std` overrides the init std of the main model (wider: logprobs spread over more nats)."""
    out = Path(out_dir)
    model = hf_model(m, seed, std)
    model.save_pretrained(out)
    if m.mtp_num_layers:
        files = sorted(out.glob("*.safetensors"))
        if len(files) != 1:
            raise RuntimeError(f"expected one safetensors file from save_pretrained, got {files}")
        tensors = load_file(files[0])
        tensors.update(mtp_tensors(m, tensors, seed))
        save_file(tensors, str(files[0]), metadata={"format": "pt"})
        config = json.loads((out / "config.json").read_text())
        config["num_nextn_predict_layers"] = m.mtp_num_layers
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return model

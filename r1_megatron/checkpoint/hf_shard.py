"""HF -> megatron at any (tp, pp, ep) layout, each rank reading only its own shard.

`import_shard` fills this rank's GPTModel chunk straight from the safetensors files: the layers of
its pipeline stage, the experts of its expert-parallel rank, and for a tensor-parallel weight only
its slice of each HF tensor (safetensors `get_slice`; FP8 weights with their scale blocks).

Why one even slice of each HF part is the whole story: a megatron TP shard of a fused weight is
[gate_r; up_r] (gate_up) or query groups r*g/tp.. of q, k and v (qkv), i.e. the r-th of tp equal
pieces of every HF part along the partition dim, merged per shard by hf.merge_fused, as the
single-rank import merges the full tensors. Names go through the one table of hf.py after mapping
local layer / expert indices to global ones.

Every HF key must be used by some rank (checked over all ranks), and the MTP layer's copies of the
embedding / head must equal their sources (checked on the slices the MTP stage reads).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1_megatron.checkpoint import hf
from r1_megatron.checkpoint.hf_io import HFCheckpoint
from r1_megatron.config.schema import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(?P<i>\d+)\.(?P<rest>.*)$")
_EXPERT = re.compile(
    r"^(?P<pre>.*\.experts\.local_experts\.)(?P<j>\d+)(?P<post>\..*)$"
    r"|^(?P<gpre>.*\.experts\.linear_fc[12]\.weight)(?P<gj>\d+)$"
)


def global_name(name: str, layer_numbers: dict[str, int], first_expert: int) -> tuple[str, bool]:
    """(name with global layer / expert ids, is an expert weight) for a local state-dict name."""
    m = _LAYER.match(name)
    if m:
        name = f"decoder.layers.{layer_numbers[m['i']]}.{m['rest']}"
    m = _EXPERT.match(name)
    if not m:
        return name, False
    if m["pre"] is not None:
        return f"{m['pre']}{first_expert + int(m['j'])}{m['post']}", True
    return f"{m['gpre']}{first_expert + int(m['gj'])}", True


def _read_part(ckpt: HFCheckpoint, name: str, split: tuple[int, int, int] | None) -> torch.Tensor:
    """The whole HF tensor, or piece r of `size` along `dim` for split = (dim, r, size)."""
    if split is None:
        return ckpt.read(name)
    dim, r, size = split
    n = ckpt.shape(name)[dim]
    if n % size:
        raise hf.ConversionError(f"'{name}' has {n} along dim {dim}, not divisible by the {size}-way split")
    return ckpt.read(name, dim, r * (n // size), n // size)


def import_shard(model: torch.nn.Module, ckpt: HFCheckpoint, cfg: ModelConfig) -> None:
    """Fill this rank's model chunk from `ckpt`, reading only its shard. Collective (the key check)."""
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    layer_numbers = {str(i): layer.layer_number - 1 for i, layer in enumerate(layers)}
    ep_size = max(ps.get_expert_model_parallel_world_size(), 1)
    first_expert = ps.get_expert_model_parallel_rank() * (cfg.num_experts // ep_size)
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    keys = set(ckpt.keys())
    used: set[str] = set()
    splits: dict[str, tuple | None] = {}  # HF name -> the split this rank read it with
    for name, target in model.state_dict(keep_vars=True).items():
        if not hf.is_weight(name):
            continue
        gname, is_expert = global_name(name, layer_numbers, first_expert)
        if cfg.tie_embeddings and gname == "output_layer.weight":
            names, kind = ("model.embed_tokens.weight",), "copy"  # the stage-local copy of the tied head
        else:
            names, kind = hf.hf_names(gname, cfg)
        missing = [n for n in names if n not in keys]
        if missing:
            raise hf.ConversionError(f"missing key '{missing[0]}' (for megatron '{gname}')")
        split = None
        if getattr(target, "tensor_model_parallel", False):
            r, size = etp if is_expert else tp
            split = (int(target.partition_dim), r, size) if size > 1 else None
        parts = [_read_part(ckpt, n, split) for n in names]
        value = hf.merge_fused(kind, parts, cfg)
        if tuple(value.shape) != tuple(target.shape):
            shapes = " + ".join(f"'{n}' {tuple(p.shape)}" for n, p in zip(names, parts))
            raise hf.ConversionError(
                f"shape mismatch: {shapes} (this rank's slice) "
                f"but megatron '{gname}' is {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        used.update(names)
        splits.update({n: split for n in names})
    used |= _check_mtp_copies(ckpt, cfg, splits)
    _check_all_used(keys, used, cfg)


def _check_mtp_copies(ckpt: HFCheckpoint, cfg: ModelConfig, splits: dict[str, tuple | None]) -> set[str]:
    """On the stage holding the MTP layers: their embedding / head copies equal the slices read."""
    mtp = tuple(f"model.layers.{cfg.num_layers + k}." for k in range(cfg.mtp_num_layers))
    if not mtp or not any(n.startswith(mtp) for n in splits):
        return set()  # this rank holds no MTP layer
    checked = set()
    for copy, source in hf.mtp_shared_names(cfg).items():
        if cfg.tie_embeddings and source == "lm_head.weight":
            source = "model.embed_tokens.weight"
        if copy not in ckpt.keys():
            raise hf.ConversionError(f"missing key '{copy}' (the MTP layer's copy of '{source}')")
        split = splits.get(source)
        if not torch.equal(_read_part(ckpt, copy, split), _read_part(ckpt, source, split)):
            raise hf.ConversionError(f"'{copy}' differs from '{source}'; megatron's MTP shares that tensor")
        checked.add(copy)
    return checked


def _check_all_used(keys: set[str], used: set[str], cfg: ModelConfig) -> None:
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(used))
    unused = keys.difference(*everyone)
    if cfg.tie_embeddings:
        unused.discard("lm_head.weight")  # a tied head may be stored; it is the embedding
    if unused:
        first = sorted(unused)[0]
        raise hf.ConversionError(f"unknown key '{first}' in the HF checkpoint ({len(unused)} unused keys)")


def read_summary(ckpt: HFCheckpoint) -> str:
    """What this rank read: tensors, bytes, and which layers / experts (the shard it was given)."""
    layers = sorted({int(m[1]) for n in ckpt.names_read if (m := re.match(r"model\.layers\.(\d+)\.", n))})
    experts = sorted({int(m[1]) for n in ckpt.names_read if (m := re.search(r"\.experts\.(\d+)\.", n))})
    return (f"read {len(ckpt.names_read)} tensors, {ckpt.bytes_read / 2**20:.2f} MiB of "
            f"{ckpt.total_bytes() / 2**20:.2f} MiB; layers {layers}; experts {experts}")

"""Stream HF-named full tensors out of any (tp, pp, ep, etp, dp) layout: `export_weights`.

The rollout refit and `r1m convert mcore-to-hf` both read weights through this one generator, with
the one name table of checkpoint/hf.py.

How a bucket is assembled. The global list of full tensors (names with global layer and expert ids,
full shapes) is agreed once from every rank's local metadata. Tensors are then taken in that order
into buckets of at most `bucket_bytes`. For each bucket every rank allocates a zero buffer, writes
the shards it *owns* at their place in the full layout, and the buffer is summed over the world:
  - TP shards land side by side along their partition dim; a fused gate/up shard [g_r; u_r] is split
    per rank, so g_r lands in the gate half and u_r in the up half;
  - EP ranks write their local experts under global ids (ep_rank * experts_per_rank + j);
  - only the owning pipeline stage writes a layer (the MTP stage's copy of the embedding is skipped);
  - exactly one replica writes each shard (DP rank 0, expert-DP rank 0, TP rank 0 for replicated
    tensors), so the sum adds zeros only and is bit-exact.
No rank holds more than one bucket of gathered weights (plus its own shards).

Every rank must iterate the generator to the end: each bucket is a collective. With `dst=None`
(default) every rank yields the same tensors; with `dst=r` only global rank r yields (a reduce
instead of an all-reduce), the others yield nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from r1_megatron.checkpoint import hf
from r1_megatron.config.schema import ModelConfig
from r1_megatron.model.redundant import export_slots

_LOCAL_EXPERT = re.compile(r"^(?P<pre>.*\.experts\.local_experts\.)(?P<j>\d+)(?P<post>\..*)$")
_GROUPED_EXPERT = re.compile(r"^(?P<pre>.*\.experts\.linear_fc[12]\.weight)(?P<j>\d+)(?P<post>)$")
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(?P<i>\d+)\.(?P<rest>.*)$")


@dataclass
class _Entry:
    """One full tensor: where it sits in the global order, its shape, and this rank's shard if owned."""

    name: str  # megatron name with global layer / expert ids
    shape: tuple[int, ...]
    dtype: torch.dtype
    order: tuple[int, int, int, int]
    shard: torch.Tensor | None = None  # set when this rank writes it
    tp_rank: int = 0
    tp_size: int = 1
    dim: int = 0
    gate_up: bool = False


def _local_entries(model: torch.nn.Module, cfg: ModelConfig) -> list[_Entry]:
    """This rank's tensors under global names, with the shards it owns."""
    ps = parallel_state
    pp_rank = ps.get_pipeline_model_parallel_rank()
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    etp_rank, etp_size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    edp_rank = ps.get_expert_data_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    experts_per_rank = cfg.num_experts // max(ps.get_expert_model_parallel_world_size(), 1)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    layer_numbers = {str(i): layer.layer_number - 1 for i, layer in enumerate(layers)}

    state = model.state_dict(keep_vars=True)
    redundant = export_slots(model)  # replica slot -> (logical expert, first replica?)
    names = [n for n in state if hf.is_weight(n)]
    first_expert_pos: dict[str, int] = {}
    entries = []
    for pos, name in enumerate(names):
        t = state[name]
        if cfg.tie_embeddings and name == "output_layer.weight":
            continue  # the HF checkpoint has no lm_head when embeddings are tied
        gname, expert, sub = name, 0, 0
        m = _DECODER_LAYER.match(name)
        if m:
            gname = f"decoder.layers.{layer_numbers[m['i']]}.{m['rest']}"
        m = _LOCAL_EXPERT.match(gname) or _GROUPED_EXPERT.match(gname)
        is_expert = m is not None
        if m:
            expert = ep_rank * experts_per_rank + int(m["j"])
            # A redundant slot exports under its logical expert, and only from that expert's first replica.
            expert, primary = redundant.get(name, (expert, True))
            gname = f"{m['pre']}{expert}{m['post']}"
            block = m["pre"]
            first_expert_pos.setdefault(block, pos)
            sub = pos
            pos = first_expert_pos[block]
        split = bool(getattr(t, "tensor_model_parallel", False))
        r, size = (etp_rank, etp_size) if is_expert else (tp_rank, tp_size)
        dim = int(getattr(t, "partition_dim", 0)) if split else 0
        shape = list(t.shape)
        if split:
            shape[dim] *= size
        replica_zero = (edp_rank if is_expert else dp_rank) == 0 and (split or r == 0)
        replica_zero = replica_zero and (not is_expert or primary)
        _, kind = hf.hf_names(gname, cfg)
        entries.append(
            _Entry(
                name=gname,
                shape=tuple(shape),
                dtype=t.dtype,
                order=(pp_rank, pos, expert, sub),
                shard=t.detach() if replica_zero else None,
                tp_rank=r if split else 0,
                tp_size=size if split else 1,
                dim=dim,
                gate_up=kind == "gate_up",
            )
        )
    return entries


def _global_plan(local: list[_Entry]) -> tuple[list[_Entry], set[str]]:
    """The agreed global order of full tensors, and the names this rank writes.

    A name declared by several pipeline stages (the MTP stage's embedding) is written by the first."""
    meta = [(e.name, e.shape, str(e.dtype), e.order, e.shard is not None) for e in local]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, meta)
    first: dict[str, tuple] = {}
    for rank_meta in everyone:
        for name, shape, dtype, order, _ in rank_meta:
            if name not in first or order < first[name][1]:
                first[name] = (shape, order, dtype)
    plan = [
        _Entry(name=n, shape=tuple(s), dtype=getattr(torch, d.split(".")[-1]), order=o)
        for n, (s, o, d) in sorted(first.items(), key=lambda kv: kv[1][1])
    ]
    mine = {e.name for e in local if e.shard is not None and e.order[0] == first[e.name][1][0]}
    return plan, mine


def _write(entry: _Entry, full: torch.Tensor) -> None:
    """Put this rank's shard at its place inside the full tensor `full` (a view into the bucket)."""
    shard = entry.shard.to(full.device, full.dtype)
    if entry.tp_size == 1:
        full.copy_(shard)
        return
    n = shard.shape[entry.dim]
    if entry.gate_up:
        # [g_r; u_r] -> rows r of the gate half and rows r of the up half.
        half_full, half = full.shape[entry.dim] // 2, n // 2
        for k, part in enumerate(torch.split(shard, half, dim=entry.dim)):
            full.narrow(entry.dim, k * half_full + entry.tp_rank * half, half).copy_(part)
        return
    full.narrow(entry.dim, entry.tp_rank * n, n).copy_(shard)


def _buckets(plan: list[_Entry], bucket_bytes: int) -> Iterator[list[_Entry]]:
    bucket: list[_Entry] = []
    size = 0
    for e in plan:
        nbytes = torch.Size(e.shape).numel() * e.dtype.itemsize
        if bucket and (size + nbytes > bucket_bytes or e.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(e)
        size += nbytes
    if bucket:
        yield bucket


def export_megatron(
    model: torch.nn.Module, cfg: ModelConfig, bucket_bytes: int = 64 * 1024**2, *, dst: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron global name, full tensor) in the single-rank model's order (see module doc).

    `model` is this rank's GPTModel chunk (unwrapped from DDP)."""
    local = _local_entries(model, cfg)
    plan, mine = _global_plan(local)
    shards = {e.name: e for e in local if e.name in mine and e.shard is not None}
    device = next(model.parameters()).device
    rank = dist.get_rank()
    for bucket in _buckets(plan, bucket_bytes):
        sizes = [torch.Size(e.shape).numel() for e in bucket]
        flat = torch.zeros(sum(sizes), dtype=bucket[0].dtype, device=device)
        views = [v.view(e.shape) for v, e in zip(flat.split(sizes), bucket, strict=True)]
        for e, view in zip(bucket, views, strict=True):
            if e.name in shards:
                _write(shards[e.name], view)
        if dst is None:
            dist.all_reduce(flat)
        else:
            dist.reduce(flat, dst=dst)
        if dst is None or rank == dst:
            yield from ((e.name, v) for e, v in zip(bucket, views, strict=True))


def export_weights(
    model: torch.nn.Module, cfg: ModelConfig, bucket_bytes: int = 64 * 1024**2, *, dst: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for every weight of the model, from any layout.

    Fused gate/up weights are split into gate_proj / up_proj; the MTP layer's copies of the embedding
    and output head follow their sources. Yielded tensors are views into a bucket; copy one to keep
    it past the next bucket if the bucket buffer must be freed. See the module doc for `dst`."""
    copies: dict[str, list[str]] = {}
    for mtp_name, source in hf.mtp_shared_names(cfg).items():
        if cfg.tie_embeddings and source == "lm_head.weight":
            source = "model.embed_tokens.weight"
        copies.setdefault(source, []).append(mtp_name)
    for name, full in export_megatron(model, cfg, bucket_bytes, dst=dst):
        names, kind = hf.hf_names(name, cfg)
        for hf_name, part in zip(names, hf.split_fused(kind, full, cfg), strict=True):
            yield hf_name, part
            for copy in copies.get(hf_name, []):
                yield copy, part

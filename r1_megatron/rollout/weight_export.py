"""Stream HF-named full tensors out of any (tp, pp, ep, etp, dp) layout: `export_weights`.

The rollout refit and `r1m convert mcore-to-hf` both read weights through this one generator, with
the one name table of checkpoint/hf.py.

How a bucket is assembled. The global list of full tensors (names with global layer and expert ids,
full shapes) is agreed once per call from every rank's local metadata. Tensors are then taken in that
order into buckets of at most `bucket_bytes`, one pipeline stage and one dtype (the params' own: bf16
when the trainer is bf16) per bucket. The ranks of the bucket's owning stage assemble it:
  - a replicated tensor is copied from the rank's own copy;
  - TP-split tensors are all-gathered within the TP group (expert-TP splits within the expert-TP
    group), each shard then put at its place along the partition dim; a fused gate/up shard
    [g_r; u_r] lands in rows r of the gate half and rows r of the up half;
  - each expert is broadcast within the EP group from the EP rank that holds it (a redundant slot
    exports only from its logical expert's first replica), under its global id;
then the owning stage broadcasts the bucket down each pipeline group (dst=r: sends it to r alone).
Every DP replica assembles in parallel, so no rank receives a weight byte twice: per rank the stream
costs at most one broadcast of the model, where the earlier zero-fill-and-all-reduce over the world
cost about two (tests/dist/test_refit_transport.py counts it). The send/receive scratch buffers
are kept per model and reused across buckets and refits (the same test checks their addresses); at
world 1 nothing is gathered and no scratch exists. The bucket buffers handed out are not reused:
vLLM's layerwise reload (model_loader/reload/layerwise.py) keeps references to loaded tensors until
their layer is complete, attention layers until the very end, so a reused bucket would be
overwritten under it.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from r1_megatron.checkpoint import hf
from r1_megatron.config.schema import ModelConfig
from r1_megatron.moe.redundant import export_slots

_LOCAL_EXPERT = re.compile(r"^(?P<pre>.*\.experts\.local_experts\.)(?P<j>\d+)(?P<post>\..*)$")
_GROUPED_EXPERT = re.compile(r"^(?P<pre>.*\.experts\.linear_fc[12]\.weight)(?P<j>\d+)(?P<post>)$")
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(?P<i>\d+)\.(?P<rest>.*)$")


@dataclass
class _Entry:
    """One full tensor: where it sits in the global order, its shape, how it is split, and this rank's
    shard (None where this rank does not export it)."""

    name: str  # megatron name with global layer / expert ids
    shape: tuple[int, ...]
    dtype: torch.dtype
    order: tuple[int, int, int, int]
    shard: torch.Tensor | None = None
    tp_size: int = 1  # TP (expert-TP for experts) ways it is split along `dim`; 1: replicated
    dim: int = 0
    gate_up: bool = False
    expert: bool = False
    owner_ep: int = 0  # experts: the EP rank that exports it

    @property
    def stage(self) -> int:
        return self.order[0]

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()


def _local_entries(model: torch.nn.Module, cfg: ModelConfig) -> list[_Entry]:
    """This rank's tensors under global names, with their shards."""
    ps = parallel_state
    pp_rank = ps.get_pipeline_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    etp_size = ps.get_expert_tensor_parallel_world_size()
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
        gname, expert, sub, primary = name, 0, 0, True
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
        size = (etp_size if is_expert else tp_size) if split else 1
        dim = int(getattr(t, "partition_dim", 0)) if split else 0
        shape = list(t.shape)
        shape[dim] *= size
        _, kind = hf.hf_names(gname, cfg)
        entries.append(
            _Entry(
                name=gname, shape=tuple(shape), dtype=t.dtype, order=(pp_rank, pos, expert, sub),
                shard=t.detach() if primary else None, tp_size=size, dim=dim,
                gate_up=kind == "gate_up" and size > 1, expert=is_expert, owner_ep=ep_rank,
            )
        )
    return entries


def _global_plan(local: list[_Entry]) -> list[_Entry]:
    """The agreed global order of full tensors, each with its owning stage and (experts) EP rank.

    A name declared by several pipeline stages (the MTP stage's embedding) is exported by the first."""
    meta = [(e.name, e.shape, str(e.dtype), e.order, e.shard is not None, e.tp_size, e.dim, e.gate_up,
             e.expert, e.owner_ep) for e in local]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, meta)
    first: dict[str, _Entry] = {}
    for rank_meta in everyone:
        for name, shape, dtype, order, exports, tp_size, dim, gate_up, expert, owner_ep in rank_meta:
            known = first.get(name)
            if known is None or order[0] < known.stage or (order[0] == known.stage and exports and expert):
                first[name] = _Entry(name, tuple(shape), getattr(torch, dtype.split(".")[-1]), tuple(order),
                                     None, tp_size, dim, gate_up, expert, owner_ep)
    return sorted(first.values(), key=lambda e: e.order)


def _place(entry: _Entry, shard: torch.Tensor, rank: int, full: torch.Tensor) -> None:
    """Put TP rank `rank`'s shard at its place inside the full tensor `full` (a view into the bucket)."""
    if entry.tp_size == 1:
        full.copy_(shard)
        return
    n = shard.shape[entry.dim]
    if entry.gate_up:
        # [g_r; u_r] -> rows r of the gate half and rows r of the up half.
        half_full, half = full.shape[entry.dim] // 2, n // 2
        for k, part in enumerate(torch.split(shard, half, dim=entry.dim)):
            full.narrow(entry.dim, k * half_full + rank * half, half).copy_(part)
        return
    full.narrow(entry.dim, rank * n, n).copy_(shard)


def _buckets(plan: list[_Entry], bucket_bytes: int) -> Iterator[list[_Entry]]:
    bucket: list[_Entry] = []
    size = 0
    for e in plan:
        nbytes = e.numel * e.dtype.itemsize
        kind = (e.dtype, e.stage)  # one dtype and one owning stage per bucket
        if bucket and (size + nbytes > bucket_bytes or kind != (bucket[0].dtype, bucket[0].stage)):
            yield bucket
            bucket, size = [], 0
        bucket.append(e)
        size += nbytes
    if bucket:
        yield bucket


class _Scratch:
    """Send/receive buffers, grown on demand and kept across buckets and refits (one set per model)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, tag: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(tag)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[tag] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


_SCRATCH: weakref.WeakKeyDictionary[torch.nn.Module, _Scratch] = weakref.WeakKeyDictionary()


def _gather_split(pairs: list[tuple[_Entry, torch.Tensor]], shards: dict[str, torch.Tensor], group,
                  scratch: _Scratch) -> None:
    """All-gather the shards of TP-split tensors within `group` and place each into its full view."""
    if not pairs:
        return
    mine = [shards[e.name] for e, _ in pairs]
    n = sum(s.numel() for s in mine)
    ref = mine[0]
    send = scratch.get("send", n, ref.dtype, ref.device)
    torch.cat([s.reshape(-1) for s in mine], out=send)
    k = dist.get_world_size(group)
    recv = scratch.get("recv", k * n, ref.dtype, ref.device)
    dist.all_gather_into_tensor(recv, send, group=group)
    for r, part in enumerate(recv.split(n)):
        for (e, full), piece in zip(pairs, part.split([s.numel() for s in mine]), strict=True):
            _place(e, piece.view(shards[e.name].shape), r, full)


def _share_experts(pairs: list[tuple[_Entry, torch.Tensor]], group, scratch: _Scratch) -> None:
    """Each EP rank broadcasts the full experts it exports (already in their views) to its EP group."""
    ep_ranks = dist.get_process_group_ranks(group)
    me = ep_ranks.index(dist.get_rank())
    for j, src in enumerate(ep_ranks):
        owned = [(e, full) for e, full in pairs if e.owner_ep == j]
        if not owned:
            continue
        sizes = [e.numel for e, _ in owned]
        buf = scratch.get("ep", sum(sizes), owned[0][1].dtype, owned[0][1].device)
        if j == me:
            torch.cat([full.reshape(-1) for _, full in owned], out=buf)
        dist.broadcast(buf, src=src, group=group)
        if j != me:
            for (_, full), piece in zip(owned, buf.split(sizes), strict=True):
                full.copy_(piece.view(full.shape))


def _assemble(bucket: list[_Entry], views: list[torch.Tensor], shards: dict[str, torch.Tensor],
              scratch: _Scratch) -> None:
    """Fill a bucket on a rank of its owning stage (see module doc)."""
    ps = parallel_state
    ep_rank = ps.get_expert_model_parallel_rank()
    pairs = list(zip(bucket, views, strict=True))
    for e, full in pairs:
        if e.tp_size == 1 and (not e.expert or e.owner_ep == ep_rank):
            full.copy_(shards[e.name])
    dense = [(e, full) for e, full in pairs if not e.expert and e.tp_size > 1]
    _gather_split(dense, shards, ps.get_tensor_model_parallel_group(), scratch)
    local_experts = [(e, full) for e, full in pairs if e.expert and e.tp_size > 1 and e.owner_ep == ep_rank]
    _gather_split(local_experts, shards, ps.get_expert_tensor_parallel_group(), scratch)
    experts = [(e, full) for e, full in pairs if e.expert]
    if experts and ps.get_expert_model_parallel_world_size() > 1:
        _share_experts(experts, ps.get_expert_model_parallel_group(), scratch)


def export_megatron(
    model: torch.nn.Module, cfg: ModelConfig, bucket_bytes: int = 64 * 1024**2, *, dst: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron global name, full tensor) in the single-rank model's order (see module doc).

    `model` is this rank's GPTModel chunk (unwrapped from DDP)."""
    local = _local_entries(model, cfg)
    plan = _global_plan(local)
    shards = {e.name: e.shard for e in local if e.shard is not None}
    scratch = _SCRATCH.setdefault(model, _Scratch())
    device = next(model.parameters()).device
    rank = dist.get_rank()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    for bucket in _buckets(plan, bucket_bytes):
        owner = bucket[0].stage
        # dst=r: of r's pipeline group, the owning stage's member sends to r; everyone else only assembles.
        sender = pp_ranks[owner] if dst in pp_ranks and dst != pp_ranks[owner] else None
        receives = dst is None or rank == dst
        if stage != owner and not receives:
            continue
        sizes = [e.numel for e in bucket]
        flat = torch.empty(sum(sizes), dtype=bucket[0].dtype, device=device)
        views = [v.view(e.shape) for v, e in zip(flat.split(sizes), bucket, strict=True)]
        if stage == owner:
            _assemble(bucket, views, shards, scratch)
        if len(pp_ranks) > 1 and dst is None:
            dist.broadcast(flat, src=pp_ranks[owner], group=pp_group)
        elif sender is not None and rank == sender:
            dist.send(flat, dst=dst)
        elif sender is not None and rank == dst:
            dist.recv(flat, src=sender)
        if receives:
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

"""Keeping redundant expert replicas identical, and moving them (docs/architecture.md#redundant-experts).

Layout: a RedundantMoELayer (moe/redundant.py) holds R physical slots over the EP group, EP rank
g holding slots [g*R/ep, (g+1)*R/ep); slot s computes logical expert phy2log[s]. Each slot has its
own parameters (SequentialMLP's local_experts[j], or TE grouped GEMM's weight{j}).

Gradients. Tokens of expert e are split among its replicas, so each replica's gradient is a partial
sum, and the no-redundancy gradient of e is their sum. `sync_replica_grads` gathers every slot's
(already DP-reduced) gradient over the EP group, forms g_e = sum over e's replicas in slot order
(a fixed order, the same on every rank), and writes g_e into every replica. Identical weights,
gradients and Adam states then stay bit-identical, and the update equals the no-redundancy one up
to float reordering. Only the first replica of each expert counts in the grad norm (the others are
marked `shared`, megatron's flag for "do not count twice"), so clipping also matches.

Rebalancing. `apply_placement` gathers every slot's weights and Adam moments over EP, takes each
logical expert's values from its first old replica, and writes them into its new slots: the model
computes the same function before and after. ReplicaManager runs it every `rebalance_every` steps
with a placement planned by EPLB from the moving-average loads (moe/expert_load.py).

Where it departs from a production implementation: the gathers move all R slots to every EP rank
(simple and exact; an all-to-all of just the moved slots would be cheaper at scale), and the
distributed optimizer's sharded state is not handled (rebalancing it raises).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads

from r1_megatron.moe.redundant import RedundantMoELayer, redundant_layers, slot_params
from r1_megatron.parallel.collectives import all_reduce_
from r1_megatron.moe.eplb import Placement, rebalance_experts
from r1_megatron.moe.expert_load import ExpertLoad

def _gather_slots(local: list[torch.Tensor], group: dist.ProcessGroup) -> torch.Tensor:
    """[R, ...]: every EP rank's local slot tensors, in slot order (an exact copy on every rank)."""
    stacked = torch.stack([t.detach() for t in local])
    parts = [torch.empty_like(stacked) for _ in range(group.size())]
    dist.all_gather(parts, stacked.contiguous(), group=group)
    return torch.cat(parts)


def replica_sum(per_slot: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """[E, ...]: for each logical expert the sum of its replicas' rows of per_slot [R, ...], added in
    slot order (no atomics: the same bits on every rank)."""
    total = per_slot[log2phy[:, 0]].clone()
    for k in range(1, log2phy.shape[1]):
        has = logcnt > k
        total[has] += per_slot[log2phy[has, k]]
    return total


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


@torch.no_grad()
def sync_replica_grads(model: torch.nn.Module) -> None:
    """Write into every replica the sum of its expert's replica gradients (collective over EP)."""
    for layer in redundant_layers(model):
        slots = slot_params(layer)
        for name in slots[0]:
            grads = [_grad(s[name]) for s in slots]
            if any(g is None for g in grads):
                continue
            summed = replica_sum(_gather_slots(grads, layer.ep_group), layer.log2phy, layer.logcnt)
            for g, slot in zip(grads, layer.local_slots, strict=True):
                g.copy_(summed[layer.phy2log[slot]])


def mark_primaries(model: torch.nn.Module, optimizer=None) -> None:
    """Flag every replica but each expert's first as `shared`, so the grad norm counts it once.

    The distributed optimizer copies the flag into its shards when it is built (build_model marks
    the initial placement before that); a later re-placement does not reach its shards."""
    mains = _main_params(optimizer) if optimizer is not None and not _distributed(optimizer) else {}
    for layer in redundant_layers(model):
        for params, slot in zip(slot_params(layer), layer.local_slots, strict=True):
            primary = int(layer.log2phy[layer.phy2log[slot], 0]) == slot
            for p in params.values():
                p.shared = not primary
                if p in mains:
                    mains[p][0].shared = not primary


def _distributed(optimizer) -> bool:
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(hasattr(o, "shard_fp32_from_float16_groups") for o in optimizers)


def _main_params(optimizer) -> dict[torch.nn.Parameter, tuple[torch.Tensor, dict]]:
    """model param -> (the param the optimizer updates, its optimizer state) for megatron's plain
    fp32 and fp16/bf16 optimizers (chained or not)."""
    out: dict = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "shard_fp32_from_float16_groups"):
            raise NotImplementedError("redundant experts: cannot rebalance a distributed optimizer")
        inner = opt.optimizer
        if hasattr(opt, "float16_groups"):
            pairs = [(m, f) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True)
                     for m, f in zip(mg, fg, strict=True)]
            pairs += [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
        else:
            pairs = [(p, p) for g in inner.param_groups for p in g["params"]]
        for model_p, main_p in pairs:
            out[model_p] = (main_p, inner.state.get(main_p, {}))
    return out


def _move(tensors: list[torch.Tensor], layer: RedundantMoELayer, new_phy2log: torch.Tensor) -> None:
    """Slot j of this rank takes the value of logical expert new_phy2log[slot_j] (read from its first
    replica under the layer's current placement)."""
    by_expert = _gather_slots(tensors, layer.ep_group)[layer.log2phy[:, 0]]
    for t, slot in zip(tensors, layer.local_slots, strict=True):
        t.copy_(by_expert[new_phy2log[slot]])


@torch.no_grad()
def tie_replica_weights(model: torch.nn.Module) -> None:
    """Make every replica a copy of its expert's first replica (after init; collective over EP)."""
    for layer in redundant_layers(model):
        slots = slot_params(layer)
        for name in slots[0]:
            _move([s[name].data for s in slots], layer, layer.phy2log)


@torch.no_grad()
def apply_placement(model: torch.nn.Module, optimizer, phy2log: torch.Tensor) -> None:
    """Re-point every redundant layer to phy2log [L_total, R] (rows indexed by MoE layer), moving
    weights and Adam moments with it. Collective over EP; the model's function does not change."""
    mains = _main_params(optimizer) if optimizer is not None else {}
    for layer in redundant_layers(model):
        row = phy2log[layer.moe_index].to(layer.phy2log.device)
        slots = slot_params(layer)
        for name in slots[0]:
            params = [s[name] for s in slots]
            _move([p.data for p in params], layer, row)
            main = [mains[p][0] for p in params if p in mains]
            if main and main[0] is not params[0]:
                _move([m.data for m in main], layer, row)
            states = [mains[p][1] for p in params if p in mains]
            keys = sorted(k for k, v in (states[0] if states else {}).items()
                          if torch.is_tensor(v) and v.shape == params[0].shape)
            for key in keys:
                _move([st[key] for st in states], layer, row)
        layer.set_placement(row)
    mark_primaries(model, optimizer)


def placement_of(model: torch.nn.Module, num_moe_layers: int, num_slots: int) -> torch.Tensor:
    """phy2log [L, R] of the whole model: rows of other pipeline stages filled in (collective over
    the world; a stage without MoE layers contributes nothing)."""
    out = torch.full((num_moe_layers, num_slots), -1, dtype=torch.int64)
    for layer in redundant_layers(model):
        out[layer.moe_index] = layer.phy2log.cpu()
    if dist.is_initialized():
        all_reduce_(out, op=dist.ReduceOp.MAX)
    return out


class ReplicaManager:
    """Expert load statistics for one Trainer of a MoE model; with redundant experts also replica
    gradient sync and periodic rebalancing.

    `attach()` hooks the gradient sync into megatron's finalize_model_grads (so it runs after the DP
    reduction and before the optimizer step); call `after_step(step)` once per optimizer step.
    """

    def __init__(self, trainer, rebalance_every: int = 0, decay: float = 0.9) -> None:
        m = trainer.cfg.model
        self.trainer = trainer
        self.num_moe_layers = m.num_layers - m.first_k_dense
        self.num_slots = m.num_experts + trainer.layout.redundant_experts
        self.redundant = trainer.layout.redundant_experts > 0
        self.rebalance_every = rebalance_every
        self.load = ExpertLoad(self.num_moe_layers, m.num_experts, decay)
        self.load.attach(trainer.unwrapped, m.first_k_dense)

    def attach(self) -> ReplicaManager:
        model = self.trainer.unwrapped
        if not self.redundant:
            return self

        def finalize(*args, **kwargs):
            finalize_model_grads(*args, **kwargs)
            sync_replica_grads(model)

        self.trainer.config.finalize_model_grads_func = finalize
        mark_primaries(model, self.trainer.optimizer)
        return self

    def plan(self) -> Placement:
        """EPLB placement for the current moving-average loads at this EP size (one node)."""
        m = self.trainer.cfg.model
        groups = m.n_group if m.n_group and m.num_experts % m.n_group == 0 else 1
        load = self.load.ema if self.load.steps else torch.ones_like(self.load.ema)
        return rebalance_experts(load, self.num_slots, groups, 1, self.trainer.layout.ep)

    def rebalance(self) -> Placement:
        placement = self.plan()
        apply_placement(self.trainer.unwrapped, self.trainer.optimizer, placement.phy2log)
        return placement

    def after_step(self, step: int) -> torch.Tensor:
        """Fold this step's loads in; rebalance when `step` is a multiple of rebalance_every."""
        load = self.load.step()
        if self.redundant and self.rebalance_every and step % self.rebalance_every == 0:
            self.rebalance()
        return load

    def discard_step(self) -> None:
        """Forget the loads counted by a step the non-finite guard skipped (no optimizer step)."""
        self.load.counts.zero_()

    def state_dict(self) -> dict:
        """Checkpoint record: the load statistics, the EP size and (redundant) the placement."""
        state = {"load": self.load.state_dict(), "ep": self.trainer.layout.ep}
        if self.redundant:
            phy2log = placement_of(self.trainer.unwrapped, self.num_moe_layers, self.num_slots)
            state["phy2log"] = phy2log.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore after the checkpoint's weights were loaded (slot s holds the saved slot s). At
        another EP size the saved placement is first adopted as is, then re-planned for this one."""
        self.load.load_state_dict(state["load"])
        if not self.redundant:
            return
        if "phy2log" not in state:
            raise ValueError("replicas: the checkpoint has no expert placement (saved without redundancy)")
        saved = torch.tensor(state["phy2log"], dtype=torch.int64)
        if saved.shape[1] != self.num_slots:
            raise ValueError(f"replicas: checkpoint has {saved.shape[1]} expert slots, not {self.num_slots}")
        for layer in redundant_layers(self.trainer.unwrapped):
            layer.set_placement(saved[layer.moe_index])
        mark_primaries(self.trainer.unwrapped, self.trainer.optimizer)
        if int(state["ep"]) != self.trainer.layout.ep:
            self.rebalance()

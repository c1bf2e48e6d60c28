"""Redundant hotspot experts (docs/architecture.md): megatron's MoELayer with R >= E physical expert slots.

The router still scores the E logical experts (its gate, expert bias, aux loss and token counts are
the logical ones). Between routing and dispatch every (token t, logical expert e) pair is moved to
one physical slot, replica (t mod logcnt[e]) of e (moe/eplb.py `replica_slots`, t = the token's
index on this rank). From there on megatron's own dispatcher and experts run unchanged, built for R
experts: EP rank g holds slots [g*R/ep, (g+1)*R/ep), slot s computing logical expert phy2log[s].

Replicas of one expert hold identical weights (moe/replicas.py keeps them so: it sums their
gradients before every optimizer step and moves weights and optimizer state on a rebalance). So the
layer computes exactly the no-redundancy function, only with the expert FLOPs spread differently.

Not a fork: the layer is megatron's MoELayer built with a copy of the TransformerConfig whose
num_moe_experts is R, plus a router built with the logical config and a `route` that remaps.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from r1_megatron.moe.eplb import Placement, rebalance_experts, replica_slots

# TE grouped GEMM experts name slot j's weight `weight{j}`.
_GROUPED = re.compile(r"^(?P<pre>.*\D)(?P<j>\d+)$")


def to_physical(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    num_slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical routing ([T, E] probs and bool map) -> physical routing ([T, R] each).

    Distinct experts own distinct slots, so each row's scatter targets are distinct and the gate
    weights (and their gradients) pass through unchanged."""
    tokens, experts = routing_map.shape
    expert_ids = torch.arange(experts, device=routing_map.device).expand(tokens, experts)
    token_index = torch.arange(tokens, device=routing_map.device)
    slots = replica_slots(expert_ids, token_index, log2phy, logcnt)
    phys_probs = probs.new_zeros(tokens, num_slots).scatter(1, slots, probs)
    phys_map = routing_map.new_zeros(tokens, num_slots).scatter(1, slots, routing_map)
    return phys_probs, phys_map


def default_placement(num_experts: int, num_slots: int, num_groups: int, num_gpus: int) -> Placement:
    """Placement for one layer before any load was measured: EPLB on uniform loads."""
    return rebalance_experts(torch.ones(1, num_experts), num_slots, num_groups, 1, num_gpus)


class RedundantMoELayer(MoELayer):
    """MoELayer over R physical expert slots for E logical experts.

    Input hidden [s, b, h] -> output [s, b, h] (as MoELayer). Buffers (this layer's row of the
    Placement): phy2log [R], log2phy [E, maxcnt] (-1 padded), logcnt [E]. `self.config` is the
    physical config (num_moe_experts = R); `self.logical_config` the model's (E). `slot_tokens` [R]
    counts the tokens each slot received since the last `slot_tokens.zero_()` (balance metrics).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MoESubmodules,
        layer_number: int | None = None,
        pg_collection=None,
        num_slots: int = 0,
        first_k_dense: int = 0,
    ) -> None:
        num_experts = config.num_moe_experts
        if num_slots < num_experts:
            raise ValueError(f"RedundantMoELayer: {num_slots} physical slots < {num_experts} experts")
        physical = copy.copy(config)  # shallow: no __post_init__ re-run (R need not fit n_group)
        physical.num_moe_experts = num_slots
        router = submodules.router

        def logical_router(*, config: TransformerConfig, pg_collection=None):
            return router(config=self.logical_config, pg_collection=pg_collection)

        object.__setattr__(self, "_logical_config", config)  # before Module.__init__ runs
        submodules = dataclasses.replace(submodules, router=logical_router)
        super().__init__(physical, submodules, layer_number, pg_collection)
        self.num_slots = num_slots
        self.first_k_dense = first_k_dense
        num_groups = config.moe_router_num_groups or 1
        ep = self.ep_group.size()
        p = default_placement(num_experts, num_slots, num_groups if num_experts % num_groups == 0 else 1, ep)
        self.register_buffer("phy2log", p.phy2log[0].clone(), persistent=False)
        self.register_buffer("log2phy", p.log2phy[0].clone(), persistent=False)
        self.register_buffer("logcnt", p.logcnt[0].clone(), persistent=False)
        self.register_buffer("slot_tokens", torch.zeros(num_slots, dtype=torch.int64), persistent=False)

    @property
    def logical_config(self) -> TransformerConfig:
        return self._logical_config

    @property
    def moe_index(self) -> int:
        """Index of this layer among the model's MoE decoder layers (its row of load / phy2log)."""
        return self.layer_number - 1 - self.first_k_dense

    @property
    def local_slots(self) -> list[int]:
        """Physical slot ids held on this EP rank, in local-expert order."""
        return list(self.local_expert_indices)

    def set_placement(self, phy2log: torch.Tensor) -> None:
        """Point the slots at new logical experts (weights must be moved by the caller)."""
        num_experts = self.logical_config.num_moe_experts
        p = Placement.from_phy2log(phy2log.view(1, -1), num_experts, self.ep_group.size())
        self.phy2log = p.phy2log[0].to(self.phy2log.device)
        self.log2phy = p.log2phy[0].to(self.log2phy.device)
        self.logcnt = p.logcnt[0].to(self.logcnt.device)

    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        phys_probs, phys_map = to_physical(probs, routing_map, self.log2phy, self.logcnt, self.num_slots)
        self.slot_tokens += phys_map.sum(0)
        return phys_probs, phys_map


def use_redundant_layer(block: TransformerBlockSubmodules, num_slots: int, first_k_dense: int) -> None:
    """Build every MoE layer of a decoder block spec as a RedundantMoELayer with `num_slots` slots."""
    for layer in block.layer_specs:
        mlp = layer.submodules.mlp
        if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
            mlp.module = RedundantMoELayer
            mlp.params = {**(mlp.params or {}), "num_slots": num_slots, "first_k_dense": first_k_dense}


def redundant_layers(model: GPTModel) -> list[RedundantMoELayer]:
    """This pipeline stage's redundant MoE layers, in layer order."""
    return [m for m in model.modules() if isinstance(m, RedundantMoELayer)]


def slot_params(layer: RedundantMoELayer) -> list[dict[str, torch.nn.Parameter]]:
    """Parameters of each local slot, by a name that is the same for every slot."""
    experts = layer.experts
    n = layer.num_local_experts
    if hasattr(experts, "local_experts"):
        return [dict(e.named_parameters()) for e in experts.local_experts]
    out: list[dict[str, torch.nn.Parameter]] = [{} for _ in range(n)]
    for name, p in experts.named_parameters():
        m = _GROUPED.match(name)
        if m is None or int(m["j"]) >= n:
            raise NotImplementedError(f"redundant experts: cannot tell which slot '{name}' belongs to")
        out[int(m["j"])][m["pre"]] = p
    return out


def export_slots(model: GPTModel) -> dict[str, tuple[int, bool]]:
    """Parameter name of every redundant expert weight -> (its logical expert, whether this slot is
    that expert's first replica). Export writes each logical expert once, from its first replica."""
    by_param: dict[int, tuple[int, bool]] = {}
    for layer in redundant_layers(model):
        for params, slot in zip(slot_params(layer), layer.local_slots, strict=True):
            expert = int(layer.phy2log[slot])
            primary = int(layer.log2phy[expert, 0]) == slot
            by_param.update({id(p): (expert, primary) for p in params.values()})
    return {name: by_param[id(p)] for name, p in model.named_parameters() if id(p) in by_param}

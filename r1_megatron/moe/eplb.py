"""Redundant-expert placement (docs/architecture.md#redundant-experts), after deepseek-ai/EPLB.

Input: load[L, E] (tokens per logical expert and MoE layer), R physical slots, G GPUs, n nodes,
K expert groups. GPU g holds physical slots [g*R/G, (g+1)*R/G). The policy is the reference's:
hierarchical when K % n == 0 (pack expert groups onto nodes, then replicate and pack inside each
node), otherwise global (one node, one group).

Where this departs from the reference:
- **No GPU holds two replicas of one expert** (EPLB issue #22). A second copy on the same GPU
  stores the weights twice and only mimics an uneven token split. So `replicate` caps an expert
  at the number of GPUs it may spread over (its node's), and `pack_replicas` forbids co-location.
  A slot count that cannot avoid co-location (R/G > experts per node) is an error.
- **Search instead of one greedy pass.** Inside each node we build several starting placements
  (the reference's own, with co-located copies turned into replicas of other experts, and the
  capped greedy for every cap that binds), improve each by a short tabu search on the heaviest
  GPU (swap replicas between GPUs, or turn a replica of one expert into a replica of another),
  and search longer from the best. The search keeps the best state it saw, so whenever the
  reference co-locates nothing on a node, our heaviest GPU there is at most the reference's.
- Forbidding co-location cannot match the reference on every input. With loads (3, 2, 1), R=4,
  G=2 the reference packs {e1, e2} | {e0, e0}, a perfect 3 | 3 (e0 effectively unreplicated).
  Every co-location-free placement doubles one expert on both GPUs, and the best is
  {e0, e1} | {e0, e2} = 3.5 | 2.5. tests/unit/test_eplb.py checks this by brute force, and checks
  that on skewed (Zipf) loads we are never worse than the reference.

Replica load model (docs/architecture.md): a token routed to expert e goes to replica (token index mod
logcnt[e]), so every replica of e carries load[e] / logcnt[e].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# A new best must lower the heaviest GPU by more than this fraction, so float noise cannot count.
_REL_TOL = 1e-9
# Tabu search budget per node: at most this many moves, stopping after PATIENCE without a new best.
_ITERS = 200
_PATIENCE = 30


@dataclass(frozen=True)
class Placement:
    """Where every physical expert slot lives, for each of L MoE layers.

    phy2log: [L, R] int64, logical expert of each physical slot; GPU g holds slots [g*R/G, (g+1)*R/G).
    log2phy: [L, E, maxcnt] int64, the slots of each logical expert in ascending order, -1 padded.
    logcnt: [L, E] int64, replicas per logical expert (>= 1); log2phy[l, e, :logcnt[l, e]] are valid.
    num_gpus: G, the EP ranks the R slots are spread over.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    num_gpus: int

    @classmethod
    def from_phy2log(cls, phy2log: torch.Tensor | Sequence, num_experts: int, num_gpus: int) -> Placement:
        """Derive log2phy and logcnt from phy2log [L, R] (e.g. when loading a checkpoint)."""
        p2l = torch.as_tensor(phy2log, dtype=torch.int64)
        num_layers, num_slots = p2l.shape
        if p2l.min() < 0 or p2l.max() >= num_experts:
            raise ValueError(f"phy2log holds expert ids outside [0, {num_experts})")
        logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        logcnt.scatter_add_(1, p2l, torch.ones_like(p2l))
        if (logcnt == 0).any():
            layer, expert = (logcnt == 0).nonzero()[0].tolist()
            raise ValueError(f"phy2log: layer {layer} has no replica of expert {expert}")
        log2phy = torch.full((num_layers, num_experts, int(logcnt.max())), -1, dtype=torch.int64)
        for layer in range(num_layers):
            filled = [0] * num_experts
            for slot, e in enumerate(p2l[layer].tolist()):
                log2phy[layer, e, filled[e]] = slot
                filled[e] += 1
        return cls(p2l, log2phy, logcnt, num_gpus)

    def as_dict(self) -> dict:
        """JSON-ready lists (the CLI output and the checkpoint record)."""
        return {
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy.tolist(),
            "logcnt": self.logcnt.tolist(),
            "num_gpus": self.num_gpus,
        }


def balanced_packing(weights: Sequence[float], num_packs: int) -> list[int]:
    """Pack index of each item: heaviest first, into the lightest pack that still has room.

    Every pack ends up with exactly len(weights) / num_packs items; ties go to the lowest pack.
    """
    if len(weights) % num_packs:
        raise ValueError(f"balanced_packing: {len(weights)} items do not split into {num_packs} packs")
    per_pack = len(weights) // num_packs
    pack_load = [0.0] * num_packs
    pack_size = [0] * num_packs
    pack_of = [-1] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        p = min((q for q in range(num_packs) if pack_size[q] < per_pack), key=pack_load.__getitem__)
        pack_of[item] = p
        pack_load[p] += weights[item]
        pack_size[p] += 1
    return pack_of


def _extra_slots(weights: Sequence[float], num_slots: int, max_count: int) -> list[int]:
    """The expert given each extra slot, in the order the greedy hands them out."""
    num_experts = len(weights)
    if not num_experts <= num_slots <= num_experts * max_count:
        raise ValueError(
            f"replicate: {num_slots} slots for {num_experts} experts, at most {max_count} replicas each"
        )
    counts = [1] * num_experts
    extras = []
    for _ in range(num_experts, num_slots):
        growable = (i for i in range(num_experts) if counts[i] < max_count)
        e = max(growable, key=lambda i: weights[i] / counts[i])
        counts[e] += 1
        extras.append(e)
    return extras


def replicate(weights: Sequence[float], num_slots: int, max_count: int | None = None) -> list[int]:
    """Replica count per expert: one each, then every extra slot to argmax w_e / count_e.

    max_count caps an expert's replicas (the GPUs it may spread over, so no two share one).
    """
    counts = [1] * len(weights)
    for e in _extra_slots(weights, num_slots, num_slots if max_count is None else max_count):
        counts[e] += 1
    return counts


def _realizable(counts: list[int], rooms: list[int]) -> bool:
    """Gale-Ryser: can experts with these replica counts fill GPUs with these free slots, with no
    expert twice on a GPU? Prefixes beyond max(rooms) hold automatically once the sums agree."""
    if sum(counts) != sum(rooms):
        return False
    desc = sorted(counts, reverse=True)
    prefix = 0
    for k in range(1, min(len(desc), max(rooms, default=0)) + 1):
        prefix += desc[k - 1]
        if prefix > sum(min(r, k) for r in rooms):
            return False
    return True


def pack_replicas(weights: Sequence[float], counts: Sequence[int], num_gpus: int) -> list[list[int]]:
    """Experts held by each GPU (each GPU gets sum(counts) / num_gpus distinct experts).

    Experts go heaviest replica first, onto the count_e lightest GPUs with room. If that choice
    would leave the rest unplaceable without co-location, the expert takes the GPUs with the most
    room instead, which (bipartite Havel-Hakimi) always keeps a valid completion.
    """
    total = sum(counts)
    if total % num_gpus or max(counts) > num_gpus:
        raise ValueError(
            f"pack_replicas: {total} replicas (up to {max(counts)} of one expert) on {num_gpus} GPUs"
        )
    rep = [w / c for w, c in zip(weights, counts)]
    order = sorted(range(len(counts)), key=lambda e: -rep[e])
    load = [0.0] * num_gpus
    room = [total // num_gpus] * num_gpus
    held: list[list[int]] = [[] for _ in range(num_gpus)]
    for idx, e in enumerate(order):
        open_gpus = [g for g in range(num_gpus) if room[g] > 0]
        pick = sorted(open_gpus, key=lambda g: (load[g], g))[: counts[e]]
        rest = [counts[f] for f in order[idx + 1 :]]
        if not _realizable(rest, [room[g] - (g in pick) for g in range(num_gpus)]):
            pick = sorted(open_gpus, key=lambda g: (-room[g], load[g], g))[: counts[e]]
        for g in pick:
            held[g].append(e)
            load[g] += rep[e]
            room[g] -= 1
    return [sorted(h) for h in held]


class _Moves:
    """Finds the best admissible move out of the heaviest GPU g. The moves, each given as the new
    loads of the GPUs it changes and its edits, a list of (gpu, expert out, expert in):
    - swap: e on g and f on another GPU h trade places;
    - convert on g: g's replica of f (count >= 2) becomes a new replica of an expert e not on g;
    - convert elsewhere: a replica of donor f on GPU h becomes a new replica of an expert e on g,
      so every holder of e gets lighter.
    A convert changes two experts' counts, so it also changes their other holders' loads. A move
    is ranked by (heaviest GPU, sum of squared loads) after it; candidates whose new load on g
    alone is already worse than the best found are skipped."""

    def __init__(self, weights, counts, held, load, sumsq, tabu: dict, step: int, best_top: float):
        self.weights, self.counts, self.held, self.load, self.sumsq = weights, counts, held, load, sumsq
        self.tabu, self.step, self.best_top = tabu, step, best_top
        self.order = sorted(range(len(held)), key=lambda x: -load[x])
        self.rep = [w / c for w, c in zip(weights, counts)]
        self.holders = [[] for _ in counts]
        for x, h in enumerate(held):
            for e in h:
                self.holders[e].append(x)
        self.best = None
        self.bound = math.inf  # heaviest GPU after the best move found so far

    def _consider(self, new: dict[int, float], edits: list[tuple[int, int, int]]) -> None:
        top = max(new.values())
        for x in self.order:
            if x not in new:
                top = max(top, self.load[x])
                break
        if top > self.bound:
            return
        key = (top, self.sumsq + sum(v * v - self.load[x] ** 2 for x, v in new.items()))
        if (self.best is None or key < self.best[0]) and self._admissible(top, edits):
            self.best, self.bound = (key, new, edits), top

    def _admissible(self, top: float, edits: list[tuple[int, int, int]]) -> bool:
        """Not putting back an expert recently moved off a GPU, unless that makes a new best."""
        if top < self.best_top * (1 - _REL_TOL):
            return True
        return all(self.tabu.get((x, e_in), -1) <= self.step for x, _, e_in in edits)

    def _convert(self, x: int, f: int, e: int, new_g: float) -> None:
        """GPU x's replica of f becomes a replica of e."""
        if new_g > self.bound:
            return
        w, c, rep, load = self.weights, self.counts, self.rep, self.load
        r_e_new, r_f_new = w[e] / (c[e] + 1), w[f] / (c[f] - 1)
        new = {y: load[y] - rep[e] + r_e_new for y in self.holders[e]}
        for y in self.holders[f]:
            new[y] = new.get(y, load[y]) + (r_e_new - rep[f] if y == x else r_f_new - rep[f])
        self._consider(new, [(x, f, e)])

    def search(self):
        held, rep, load, counts, w = self.held, self.rep, self.load, self.counts, self.weights
        g, num_gpus = self.order[0], len(held)
        for e in held[g]:
            for h in range(num_gpus):
                if h == g or e in held[h]:
                    continue
                for f in held[h]:
                    new_g = load[g] - rep[e] + rep[f]
                    if rep[f] < rep[e] and f not in held[g] and new_g <= self.bound:
                        self._consider({g: new_g, h: load[h] - rep[f] + rep[e]}, [(g, e, f), (h, f, e)])
        growable = [e for e in range(len(counts)) if counts[e] < num_gpus and e not in held[g]]
        for f in held[g]:
            if counts[f] >= 2:
                for e in growable:
                    self._convert(g, f, e, load[g] - rep[f] + w[e] / (counts[e] + 1))
        for e in held[g]:
            if counts[e] >= num_gpus:
                continue
            drop = rep[e] - w[e] / (counts[e] + 1)
            for f in range(len(counts)):
                if counts[f] < 2 or f == e:
                    continue
                new_g = load[g] - drop + (w[f] / (counts[f] - 1) - rep[f] if f in held[g] else 0.0)
                for x in self.holders[f]:
                    if e not in held[x]:
                        self._convert(x, f, e, new_g)
        return self.best


def _search(weights: Sequence[float], counts: list[int], held: list[set[int]], iters: int, patience: int):
    """Tabu search on the heaviest GPU, in place; keeps the best state seen. Objective: the
    heaviest GPU, then the sum of squared loads. Each step takes the best move out of the
    heaviest GPU even if it is worse, so the search walks off local optima; an expert just
    moved off a GPU may not come back for a few steps unless that beats the best."""
    num_gpus = len(held)
    load = [sum(weights[e] / counts[e] for e in h) for h in held]
    key = (max(load), sum(v * v for v in load))
    best_key, best = key, (list(counts), [set(h) for h in held])
    tenure = max(3, num_gpus // 2)
    tabu: dict[tuple[int, int], int] = {}
    since_best = 0
    for step in range(iters):
        choice = _Moves(weights, counts, held, load, key[1], tabu, step, best_key[0]).search()
        if choice is None:
            break
        key, new, edits = choice
        for x, e_out, e_in in edits:
            held[x].remove(e_out)
            held[x].add(e_in)
            tabu[(x, e_out)] = step + tenure
        if len(edits) == 1:
            _, e_out, e_in = edits[0]
            counts[e_out] -= 1
            counts[e_in] += 1
        for x in new:  # recomputed, not updated by differences, so the loads do not drift
            load[x] = sum(weights[e] / counts[e] for e in held[x])
        key = (max(load), sum(v * v for v in load))
        if key[0] < best_key[0] * (1 - _REL_TOL):
            best_key, best, since_best = key, (list(counts), [set(h) for h in held]), 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    counts[:] = best[0]
    for h, b in zip(held, best[1]):
        h.clear()
        h.update(b)


def _reference_start(weights: Sequence[float], num_slots: int, num_gpus: int) -> tuple[list[int], list[set]]:
    """The reference's placement (uncapped replicate, plain balanced_packing) with co-location
    removed: each GPU keeps one copy of an expert, and every freed slot takes the expert not on
    that GPU whose new replica adds the least load there. If the reference co-locates nothing,
    this is exactly its placement, so the local search can only improve on it."""
    num_experts = len(weights)
    replicas = list(range(num_experts)) + _extra_slots(weights, num_slots, num_slots)
    counts = [replicas.count(e) for e in range(num_experts)]
    pack_of = balanced_packing([weights[e] / counts[e] for e in replicas], num_gpus)
    held: list[set[int]] = [set() for _ in range(num_gpus)]
    for e, g in zip(replicas, pack_of):
        held[g].add(e)
    counts = [sum(e in h for h in held) for e in range(num_experts)]
    load = [sum(weights[e] / counts[e] for e in h) for h in held]
    per_gpu = num_slots // num_gpus
    for g in sorted(range(num_gpus), key=lambda x: -load[x]):
        while len(held[g]) < per_gpu:
            absent = (x for x in range(num_experts) if x not in held[g])
            f = min(absent, key=lambda x: weights[x] / (counts[x] + 1))
            held[g].add(f)
            counts[f] += 1
    return counts, held


def _place_node(weights: list[float], num_slots: int, num_gpus: int) -> list[list[int]]:
    """Node-local expert indices held by each of the node's GPUs.

    Starts: the repaired reference placement, and the capped greedy for every cap that binds.
    """
    starts = [_reference_start(weights, num_slots, num_gpus)]
    top_cap = min(num_gpus, max(replicate(weights, num_slots)))
    for cap in range(top_cap, -(-num_slots // len(weights)) - 1, -1):
        counts = replicate(weights, num_slots, max_count=cap)
        starts.append((counts, [set(h) for h in pack_replicas(weights, counts, num_gpus)]))
    # a short search from every start, then a long one from the best
    for counts, held in starts:
        _search(weights, counts, held, iters=_ITERS, patience=3)
    counts, held = min(starts, key=lambda st: max(sum(weights[e] / st[0][e] for e in h) for h in st[1]))
    _search(weights, counts, held, iters=_ITERS, patience=_PATIENCE)
    return [sorted(h) for h in held]


def _place_layer(w: list[float], num_slots: int, num_groups: int, num_nodes: int, num_gpus: int) -> list[int]:
    group_size = len(w) // num_groups
    group_load = [sum(w[k * group_size : (k + 1) * group_size]) for k in range(num_groups)]
    node_of_group = balanced_packing(group_load, num_nodes)
    phy2log: list[int] = []
    for node in range(num_nodes):
        experts = [
            e
            for k in range(num_groups)
            if node_of_group[k] == node
            for e in range(k * group_size, (k + 1) * group_size)
        ]
        for local in _place_node([w[e] for e in experts], num_slots // num_nodes, num_gpus // num_nodes):
            phy2log += [experts[i] for i in local]
    return phy2log


def check_inputs(load: np.ndarray, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """Raise ValueError with a one-line reason if the problem is malformed or forces co-location."""
    if load.ndim != 2 or load.shape[0] == 0 or load.shape[1] == 0:
        raise ValueError(f"load must be a non-empty [layers, experts] matrix, got shape {tuple(load.shape)}")
    bad = np.argwhere(~np.isfinite(load))
    if len(bad):
        raise ValueError(f"load[{bad[0][0]}][{bad[0][1]}] = {load[tuple(bad[0])]} is not finite")
    bad = np.argwhere(load < 0)
    if len(bad):
        raise ValueError(f"load[{bad[0][0]}][{bad[0][1]}] = {load[tuple(bad[0])]} is negative")
    num_experts = load.shape[1]
    sizes = {"slots": num_slots, "groups": num_groups, "nodes": num_nodes, "gpus": num_gpus}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_slots % num_gpus:
        raise ValueError(f"slots ({num_slots}) must be divisible by gpus ({num_gpus})")
    if num_slots < num_experts:
        raise ValueError(f"slots ({num_slots}) must be >= experts ({num_experts}): every expert needs a slot")
    if num_gpus % num_nodes:
        raise ValueError(f"gpus ({num_gpus}) must be divisible by nodes ({num_nodes})")
    if num_experts % num_groups:
        raise ValueError(f"experts ({num_experts}) must be divisible by groups ({num_groups})")
    nodes = num_nodes if num_groups % num_nodes == 0 else 1
    if num_slots // num_gpus > num_experts // nodes:
        raise ValueError(
            f"slots per GPU ({num_slots // num_gpus}) exceed the {num_experts // nodes} experts of a node: "
            "some GPU would hold two replicas of one expert "
            f"(need slots <= {num_experts * num_gpus // nodes})"
        )


def _float64(load: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    if isinstance(load, torch.Tensor):
        load = load.detach().to("cpu", torch.float64)
    return np.asarray(load, dtype=np.float64)


def rebalance_experts(
    load: torch.Tensor | np.ndarray | Sequence,
    num_slots: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> Placement:
    """Place R = num_slots physical expert slots on num_gpus GPUs for each layer of load[L, E]."""
    load = _float64(load)
    check_inputs(load, num_slots, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    rows = [_place_layer(row.tolist(), num_slots, num_groups, num_nodes, num_gpus) for row in load]
    return Placement.from_phy2log(rows, load.shape[1], num_gpus)


def gpu_loads(load: torch.Tensor | np.ndarray, placement: Placement) -> torch.Tensor:
    """[L, G] tokens per GPU: each replica carries load[e] / logcnt[e]."""
    load = torch.from_numpy(_float64(load))
    p2l = placement.phy2log
    per_slot = load.gather(1, p2l) / placement.logcnt.gather(1, p2l)
    return per_slot.view(p2l.shape[0], placement.num_gpus, -1).sum(-1)


def baseline_gpu_loads(load: torch.Tensor | np.ndarray, num_gpus: int) -> torch.Tensor:
    """[L, G] tokens per GPU without redundancy: the E experts laid contiguously, expert e on GPU
    e*G // E (E/G each when it divides)."""
    load = torch.from_numpy(_float64(load))
    gpu_of = torch.arange(load.shape[1]) * num_gpus // load.shape[1]
    return torch.zeros(load.shape[0], num_gpus, dtype=torch.float64).index_add_(1, gpu_of, load)


def max_mean(per_gpu: torch.Tensor) -> torch.Tensor:
    """[L] heaviest GPU over the mean GPU (1.0 is perfect balance; a layer with no load counts as 1)."""
    mean = per_gpu.mean(-1)
    ratio = per_gpu.max(-1).values / mean.clamp_min(math.ulp(0.0))
    return torch.where(mean > 0, ratio, torch.ones_like(mean))


def rank_experts(placement: Placement, layer: int, rank: int) -> list[int]:
    """Logical expert ids of the slots EP rank `rank` holds in `layer`, in slot order."""
    per_gpu = placement.phy2log.shape[1] // placement.num_gpus
    return placement.phy2log[layer, rank * per_gpu : (rank + 1) * per_gpu].tolist()


def replica_slots(
    expert_ids: torch.Tensor, token_index: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor
) -> torch.Tensor:
    """Physical slot for each routed (token, expert): replica (token index mod logcnt[e]) of e.

    expert_ids: [T, k] (or [T]) logical ids; token_index: [T]; log2phy: [E, maxcnt] and logcnt: [E]
    of one layer. Returns a tensor shaped like expert_ids.
    """
    token_index = token_index.view(-1, *([1] * (expert_ids.dim() - 1)))
    return log2phy[expert_ids, token_index % logcnt[expert_ids]]

"""Test-only baseline: the deepseek-ai/EPLB algorithm exactly as docs/architecture.md describes it.

It is written independently of `r1_megatron.moe.eplb` so that the placement there can be
compared against it. Unlike ours, it may put two replicas of one expert on the same GPU
(deepseek-ai/EPLB issue #22). Shapes: load [L, E]; phy2log [L, R]; logcnt [L, E].
Ties break towards the lowest index, as torch's min/argmax do in the original.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weights: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Heaviest first, each item into the lightest pack that still has room (len(w)/m per pack).

    Returns (pack index [n], rank of the item inside its pack [n]).
    """
    n = len(weights)
    per_pack = n // num_packs
    if per_pack == 1:  # the original's shortcut: item i goes alone into pack i
        return np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    pack = np.full(n, -1, dtype=np.int64)
    rank = np.full(n, -1, dtype=np.int64)
    pack_load = [0.0] * num_packs
    pack_size = [0] * num_packs
    for item in np.argsort(-np.asarray(weights, dtype=np.float64), kind="stable"):
        open_packs = [p for p in range(num_packs) if pack_size[p] < per_pack]
        p = min(open_packs, key=lambda q: pack_load[q])
        pack[item], rank[item] = p, pack_size[p]
        pack_load[p] += float(weights[item])
        pack_size[p] += 1
    return pack, rank


def replicate(weights: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One replica per expert, then each extra slot to argmax w_e / count_e.

    Returns (phy2log [num_phy], replica rank [num_phy], count [E]).
    """
    w = np.asarray(weights, dtype=np.float64)
    num_log = len(w)
    phy2log = list(range(num_log))
    rank = [0] * num_log
    count = np.ones(num_log, dtype=np.int64)
    for _ in range(num_log, num_phy):
        e = int(np.argmax(w / count))
        phy2log.append(e)
        rank.append(int(count[e]))
        count[e] += 1
    return np.array(phy2log, dtype=np.int64), np.array(rank, dtype=np.int64), count


def _hierarchical_layer(
    w: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_log = len(w)
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. groups -> nodes; a node's experts are its groups in pack-rank order
    group_pack, group_rank = balanced_packing(w.reshape(num_groups, group_size).sum(1), num_nodes)
    node_experts = np.empty((num_nodes, groups_per_node * group_size), dtype=np.int64)
    for g in range(num_groups):
        start = group_rank[g] * group_size
        experts = np.arange(g * group_size, (g + 1) * group_size)
        node_experts[group_pack[g], start : start + group_size] = experts

    phy2log = np.full(num_phy, -1, dtype=np.int64)
    phy_rank = np.full(num_phy, -1, dtype=np.int64)
    logcnt = np.zeros(num_log, dtype=np.int64)
    for node in range(num_nodes):
        experts = node_experts[node]
        # 2. replicate inside the node
        p2m, rank, count = replicate(w[experts], phy_per_node)
        logcnt[experts] = count
        # 3. pack the replicas (load / count each) onto the node's GPUs
        pack, in_pack = balanced_packing(w[experts][p2m] / count[p2m], gpus_per_node)
        # 4. compose: replica j lands on slot node*R/n + pack*R/g + rank-in-pack
        slots = node * phy_per_node + pack * phy_per_gpu + in_pack
        phy2log[slots] = experts[p2m]
        phy_rank[slots] = rank
    return phy2log, phy_rank, logcnt


def rebalance_experts(
    load: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hierarchical when groups % nodes == 0, else global. Returns (phy2log, log2phy, logcnt)."""
    load = np.asarray(load, dtype=np.float64)
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    layers = [_hierarchical_layer(row, num_phy, num_groups, num_nodes, num_gpus) for row in load]
    phy2log = np.stack([p for p, _, _ in layers])
    logcnt = np.stack([c for _, _, c in layers])
    log2phy = np.full((*logcnt.shape, int(logcnt.max())), -1, dtype=np.int64)
    for layer, (p2l, rank, _) in enumerate(layers):
        log2phy[layer, p2l, rank] = np.arange(num_phy)
    return phy2log, log2phy, logcnt

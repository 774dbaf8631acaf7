"""Comparison policies, written from their published descriptions.

- EPLB (DeepSeek): give spare slots to the expert with the highest load per replica, then pack
  replicas onto devices heaviest first, each to the least-loaded device with room; hierarchical
  (expert groups to nodes first) when the model's groups divide evenly among nodes. Equal shares.
- Shadowing (FasterMoE): broadcast the hottest expert to every device, where each device serves
  its own tokens of it, while the cost model says the broadcast pays.
- Capacity-factor dropping (GShard, DeepSpeed-MoE): plain placement; each source keeps at most
  `capacity_factor * its tokens / experts` tokens per expert replica and drops the rest.
"""

from __future__ import annotations

import numpy as np

from cost_models.cluster import Cluster
from cost_models.files import InputError
from planner.plan import static_layer
from planner.score import objective

CAPACITY_FACTOR = 1.25


# --- EPLB ------------------------------------------------------------------------------------
def replicate(load: np.ndarray, total: int) -> np.ndarray:
    """Replica counts: each spare slot goes to the expert with the highest load per replica."""
    n = np.ones(len(load), dtype=np.int64)
    for _ in range(total - len(load)):
        n[int(np.argmax(load / n))] += 1
    return n


def balanced_packing(weight: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Heaviest item first, each into the lightest pack that still has room. Returns pack ids."""
    load = np.zeros(len(capacity))
    used = np.zeros(len(capacity), dtype=np.int64)
    pack = np.empty(len(weight), dtype=np.int64)
    for i in np.argsort(-weight, kind="stable"):
        room = np.flatnonzero(used < capacity)
        p = room[int(np.argmin(load[room]))]
        pack[i] = p
        load[p] += weight[i]
        used[p] += 1
    return pack


def eplb(load: np.ndarray, slots: np.ndarray, node_of: np.ndarray,
         groups: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's placement as (x[e, g], share[e, g]); duplicate replicas on one device are merged."""
    phys = eplb_physical(load, slots, node_of, groups)
    return phys > 0, phys / phys.sum(axis=1, keepdims=True)


def eplb_physical(load: np.ndarray, slots: np.ndarray, node_of: np.ndarray,
                  groups: int | None = None) -> np.ndarray:
    """EPLB's physical replicas per (expert, device), `phys[e, g]` (a device may hold two).

    `groups`: the model's expert groups (group-limited routing, as in DeepSeek-V3), contiguous.
    As published, the hierarchical policy (groups to nodes, then replicas to devices) applies only
    when the groups divide evenly among the nodes; a model without groups (one group) gets the
    global policy."""
    load = np.asarray(load, dtype=np.float64)
    num_experts, num_devices = len(load), len(slots)
    nodes = np.unique(node_of)
    node_slots = np.array([slots[node_of == n].sum() for n in nodes])
    groups = groups or 1
    per_node = groups // len(nodes)
    hierarchical = (len(nodes) > 1 and groups % len(nodes) == 0 and num_experts % groups == 0
                    and len(set(node_slots.tolist())) == 1 and node_slots[0] >= num_experts // len(nodes))
    if hierarchical:  # contiguous expert groups packed onto nodes by group load
        group_of = np.arange(num_experts) // (num_experts // groups)
        node_pick = balanced_packing(np.bincount(group_of, weights=load, minlength=groups),
                                     np.full(len(nodes), per_node))
        parts = [(np.flatnonzero(node_pick[group_of] == k), np.flatnonzero(node_of == n))
                 for k, n in enumerate(nodes)]
    else:
        parts = [(np.arange(num_experts), np.arange(num_devices))]
    phys = np.zeros((num_experts, num_devices))  # physical replicas per (expert, device)
    for experts, devices in parts:
        reps = replicate(load[experts], int(slots[devices].sum()))
        items = np.repeat(experts, reps)
        weight = np.repeat(load[experts] / reps, reps)
        pack = balanced_packing(weight, slots[devices])
        np.add.at(phys, (items, devices[pack]), 1.0)
    return phys


# --- FasterMoE shadowing -----------------------------------------------------------------------
def shadow(cluster: Cluster, counts: np.ndarray, current, interval: int = 50):
    """Static placement plus shadowed experts; each shadow serves its own device's tokens."""
    num_experts = counts.shape[1]
    base = static_layer(num_experts, cluster.slots)
    x, share, owner = base.replicas(), base.shares(), base.owner
    best = objective(cluster, counts, x, share, owner, current, interval)
    load = counts.sum(axis=0)
    n = 0
    for e in np.argsort(-load, kind="stable"):
        free = cluster.slots - x.sum(axis=0)
        if not ((free > 0) | x[e]).all() or load[e] == 0:
            break
        x2, s2 = x.copy(), share.copy()
        x2[e] = True
        s2[e] = counts[:, e] / load[e]
        s2[e, owner[e]] = max(s2[e, owner[e]], 0.0)
        s2[e] = s2[e] / s2[e].sum()
        obj = objective(cluster, counts, x2, s2, owner, current, interval)
        if obj >= best:
            break
        x, share, best, n = x2, s2, obj, n + 1
    return x, share, owner, n


# --- capacity-factor dropping --------------------------------------------------------------------
def drop_over_capacity(counts: np.ndarray, x: np.ndarray, share: np.ndarray,
                       capacity_factor: float = CAPACITY_FACTOR) -> tuple[np.ndarray, int]:
    """(kept_counts[source, expert], dropped tokens). Capacity is per source, as in GShard:
    `capacity_factor * source tokens / experts` per expert replica."""
    counts = np.asarray(counts, dtype=np.float64)
    if capacity_factor <= 0:
        raise InputError(f"the capacity factor must be positive, got {capacity_factor}")
    if counts.ndim != 2 or counts.shape[1] != np.asarray(x).shape[0]:
        raise InputError(f"loads of shape {counts.shape} do not match a placement of {np.asarray(x).shape[0]} experts")
    reps = np.asarray(x, bool).sum(axis=1)
    cap = np.floor(capacity_factor * counts.sum(axis=1, keepdims=True) / counts.shape[1] * reps[None, :])
    kept = np.minimum(counts, cap)
    return kept, int(round((counts - kept).sum()))

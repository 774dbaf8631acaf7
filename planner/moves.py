"""The difference between two plans as the transfers that apply it.

A new replica needs the expert's weights; a moved owner also needs the optimizer state.
Replicas that disappear cost nothing. Which source serves a copy is decided in one place,
`cost_models.estimator.migration_transfers`, so that moves and their estimated cost agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import migration_transfers
from cost_models.files import InputError
from planner.plan import Plan

WEIGHTS, OPTIMIZER = "weights", "optimizer"


@dataclass(frozen=True)
class Move:
    layer: int  # position in the plan's layer list
    expert: int
    src: int
    dst: int
    kind: str  # WEIGHTS or OPTIMIZER
    bytes: int


def layer_moves(old_x: np.ndarray, old_owner: np.ndarray, new_x: np.ndarray, new_owner: np.ndarray,
                cluster: Cluster, layer: int = 0) -> list[Move]:
    """Moves for one layer from [experts, devices] replica matrices and owner vectors."""
    return [Move(layer, *t) for t in migration_transfers(cluster, old_x, old_owner, new_x, new_owner)]


def diff(old: Plan, new: Plan, cluster: Cluster) -> list[Move]:
    """All moves that turn `old` into `new` (same experts, devices and layer count)."""
    if (old.num_experts, old.num_devices, len(old.layers)) != (new.num_experts, new.num_devices, len(new.layers)):
        raise InputError(
            f"plans differ in shape: {old.num_experts} experts x {old.num_devices} devices x {len(old.layers)} "
            f"layers against {new.num_experts} x {new.num_devices} x {len(new.layers)}")
    if new.num_devices != cluster.num_devices:
        raise InputError(f"plans have {new.num_devices} devices, the cluster has {cluster.num_devices}")
    moves = []
    for i, (a, b) in enumerate(zip(old.layers, new.layers)):
        moves += layer_moves(a.replicas(), a.owner, b.replicas(), b.owner, cluster, i)
    return moves


def summarize(moves: list[Move]) -> dict:
    return {"moves": len(moves),
            "weight_copies": sum(m.kind == WEIGHTS for m in moves),
            "owner_moves": sum(m.kind == OPTIMIZER for m in moves),
            "bytes": sum(m.bytes for m in moves)}

"""Plans to and from DeepSeek EPLB's mapping tensors, as plain numpy arrays.

EPLB numbers physical experts `device * slots + slot`; `phy2log[layer, phy]` is the logical
expert there, `log2phy[layer, expert, r]` lists its physical ids (-1 padded) and
`logcnt[layer, expert]` counts them. EPLB gives every replica an equal share and has no owners;
our export adds `phy_share` and `owner` so that a FlexMoE plan survives the round trip exactly,
and the import takes them when present. Empty slots are -1 in `phy2log`.
"""

from __future__ import annotations

import os

import numpy as np

from cost_models.files import InputError, atomic_path, read_npz
from planner.plan import EMPTY, LayerPlan, Plan


def to_eplb(plan: Plan) -> dict[str, np.ndarray]:
    if len(set(plan.slots.tolist())) != 1:
        raise InputError("EPLB's mapping needs the same slot count on every device")
    max_rep = max(int(l.replica_counts().max()) for l in plan.layers)
    phy2log = np.stack([l.assign.reshape(-1) for l in plan.layers])
    phy_share = np.stack([l.share.reshape(-1) for l in plan.layers])
    log2phy = np.full((len(plan.layers), plan.num_experts, max_rep), -1, dtype=np.int64)
    logcnt = np.zeros((len(plan.layers), plan.num_experts), dtype=np.int64)
    for i, row in enumerate(phy2log):
        for phy, e in enumerate(row):
            if e != EMPTY:
                log2phy[i, e, logcnt[i, e]] = phy
                logcnt[i, e] += 1
    owner = np.stack([l.owner for l in plan.layers])
    return {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt, "phy_share": phy_share, "owner": owner}


def from_eplb(phy2log: np.ndarray, num_devices: int, num_experts: int | None = None,
              log2phy: np.ndarray | None = None, logcnt: np.ndarray | None = None,
              phy_share: np.ndarray | None = None, owner: np.ndarray | None = None) -> Plan:
    """A plan from EPLB's tensors. Two replicas of one expert on one device become one replica
    with their shares added (the device does the same work either way)."""
    phy2log = np.atleast_2d(np.asarray(phy2log, dtype=np.int64))
    layers, num_phy = phy2log.shape
    if num_devices < 1 or num_phy % num_devices:
        raise InputError(f"{num_phy} physical experts do not divide among {num_devices} devices")
    slots = num_phy // num_devices
    if num_experts is None:
        num_experts = int(phy2log.max()) + 1
    if ((phy2log < EMPTY) | (phy2log >= num_experts)).any():
        raise InputError(f"phy2log holds ids outside -1..{num_experts - 1}")
    counts = np.stack([np.bincount(r[r != EMPTY], minlength=num_experts) for r in phy2log])
    if logcnt is not None and not np.array_equal(np.asarray(logcnt), counts):
        raise InputError("logcnt disagrees with phy2log")
    if log2phy is not None:
        log2phy = np.asarray(log2phy)
        for i in range(layers):
            for e in range(num_experts):
                listed = sorted(p for p in log2phy[i, e].tolist() if p >= 0)
                if listed != sorted(np.flatnonzero(phy2log[i] == e).tolist()):
                    raise InputError(f"log2phy disagrees with phy2log at layer {i}, expert {e}")
    if (counts == 0).any():
        i, e = np.argwhere(counts == 0)[0]
        raise InputError(f"expert {e} has no physical replica in layer {i}")
    plans = []
    for i in range(layers):
        assign = phy2log[i].reshape(num_devices, slots).copy()
        if phy_share is not None:
            share = np.asarray(phy_share[i], dtype=np.float64).reshape(num_devices, slots).copy()
        else:
            share = np.where(assign == EMPTY, 0.0, 1.0 / counts[i][np.maximum(assign, 0)])
        for g in range(num_devices):
            for s in range(slots):
                e = assign[g, s]
                if e == EMPTY:
                    continue
                first = int(np.flatnonzero(assign[g] == e)[0])
                if first != s:  # merge a duplicate into the device's first replica of e
                    share[g, first] += share[g, s]
                    assign[g, s], share[g, s] = EMPTY, 0.0
        if owner is not None:
            own = np.asarray(owner[i], dtype=np.int64)
        else:  # the first physical replica owns
            own = np.array([int(np.flatnonzero(phy2log[i] == e)[0]) // slots for e in range(num_experts)])
        plans.append(LayerPlan(assign, share, own, i, {"solver": "eplb-import"}))
    return Plan(num_experts, np.full(num_devices, slots), plans, {"source": "eplb-mapping"}).validate()


def save_eplb(plan: Plan, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **to_eplb(plan))


def load_eplb(path: str | os.PathLike, num_devices: int) -> Plan:
    arrays = read_npz(path, "EPLB mapping")
    if "phy2log" not in arrays:
        raise InputError("missing array 'phy2log'", path)
    for name, arr in arrays.items():
        if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
            raise InputError(f"array {name!r} must hold finite numbers", path)
    num_experts = arrays["logcnt"].shape[-1] if "logcnt" in arrays else None
    try:
        return from_eplb(arrays["phy2log"], num_devices, num_experts, arrays.get("log2phy"),
                         arrays.get("logcnt"), arrays.get("phy_share"), arrays.get("owner"))
    except InputError as exc:
        raise InputError(exc.problem, path) from None
    except (ValueError, IndexError, TypeError, OverflowError) as exc:  # shapes that do not fit together
        raise InputError(f"inconsistent EPLB mapping arrays: {exc}", path) from None

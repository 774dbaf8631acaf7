"""Placements as *physical* expert maps, for frameworks that give every replica an equal share.

SGLang's `--init-expert-location` and DeepSeek EPLB's `rebalance_experts` describe a placement as
`phy2log[layer, physical]`: physical expert `device * slots + slot` runs logical expert
`phy2log[...]`. There is no empty slot (SGLang maps a `-1` to the last expert, by Python's
negative indexing) and no share: the framework splits an expert's tokens evenly over its
physical replicas. This module (numpy, no torch) turns a FlexMoE plan into such a map and
searches placements for the equal-share objective:

- `fill_slots`: give every empty slot a replica, each time the one that leaves the busiest
  device lightest under equal shares (then the smallest sum of squared device loads);
- `balance_equal_shares`: steepest-descent local search on (busiest device's tokens, sum of
  squares) with two moves: swap two physical replicas between devices, and re-assign one
  physical replica of an expert that has several to another expert;
- `physical_map(plan, loads)`: the plan's own placement with its spare slots filled;
- `equal_share_plan(plan, phy2log)`: the plan a framework actually runs from that map (equal
  shares, the plan's owners), to be scored with the estimator next to the plan's own shares.
"""

from __future__ import annotations

import numpy as np

from cost_models.files import InputError
from planner.eplb_mapping import from_eplb
from planner.plan import EMPTY, Plan

_TOL = 1e-9


def equal_share_loads(assign: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Tokens per device when every physical replica serves an equal share of its expert.
    `assign[device, slot]` holds expert ids (EMPTY slots carry nothing)."""
    assign = np.asarray(assign)
    load = np.asarray(load, dtype=np.float64)
    used = assign != EMPTY
    cnt = np.bincount(assign[used], minlength=len(load)).astype(np.float64)
    if (cnt[load > 0] == 0).any():
        raise InputError("an expert with tokens has no physical replica")
    per = np.divide(load, cnt, out=np.zeros_like(load), where=cnt > 0)
    return np.where(used, per[np.maximum(assign, 0)], 0.0).sum(axis=1)


def _key(loads: np.ndarray) -> tuple[float, float]:
    return float(loads.max()), float((loads ** 2).sum())


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a strictly better than b: a lower maximum, or the same maximum and a lower sum of squares."""
    scale = max(abs(b[0]), 1.0)
    if a[0] < b[0] - _TOL * scale:
        return True
    return abs(a[0] - b[0]) <= _TOL * scale and a[1] < b[1] - _TOL * max(abs(b[1]), 1.0)


def fill_slots(assign: np.ndarray, load: np.ndarray) -> np.ndarray:
    """`assign` with every EMPTY slot given a replica. Each empty slot, in device order, takes the
    expert (preferring one the device does not hold yet) that gives the best equal-share key."""
    assign = np.array(assign, dtype=np.int64, copy=True)
    num_experts = len(load)
    for g, s in zip(*np.nonzero(assign == EMPTY)):
        present = set(assign[g][assign[g] != EMPTY].tolist())
        candidates = [e for e in range(num_experts) if e not in present] or list(range(num_experts))
        best, best_key = None, None
        for e in candidates:
            assign[g, s] = e
            k = _key(equal_share_loads(assign, load))
            if best is None or _better(k, best_key):
                best, best_key = e, k
        assign[g, s] = best
    return assign


def balance_equal_shares(assign: np.ndarray, load: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """Improve a full physical placement (no EMPTY) for equal shares by steepest descent.

    Moves: swap a physical replica on a device within tolerance of the busiest with one on another
    device; re-assign any physical replica whose expert has others to a different expert (its
    count falls by one, the other's rises, which changes every device that holds either). A move is kept
    only when it strictly improves (busiest device's tokens, sum of squared device tokens), so
    the result is never worse than the start."""
    a = np.array(assign, dtype=np.int64, copy=True)
    if (a == EMPTY).any():
        raise InputError("balance_equal_shares needs every slot filled (fill_slots first)")
    load = np.asarray(load, dtype=np.float64)
    dev_of = np.repeat(np.arange(a.shape[0]), a.shape[1])
    for _ in range(max_iter):
        cnt = np.bincount(a.reshape(-1), minlength=len(load)).astype(np.float64)
        per = load / cnt  # tokens per physical replica of each expert
        loads = per[a].sum(axis=1)
        best_key, best_move = _best_swap(a, per, loads, dev_of)
        best_key, best_move = _best_reassign(a, load, cnt, per, loads, dev_of, best_key, best_move)
        if best_move is None:
            break
        kind, g1, s1, arg = best_move
        if kind == "swap":
            g2, s2 = divmod(arg, a.shape[1])
            a[g1, s1], a[g2, s2] = a[g2, s2], a[g1, s1]
        else:
            a[g1, s1] = arg
    return a


def _best_swap(a: np.ndarray, per: np.ndarray, loads: np.ndarray, dev_of: np.ndarray):
    """The best swap of a replica on a busiest device (within tolerance) with one elsewhere:
    `(key, ("swap", g1, s1, flat slot))`, or `(current key, None)` when none improves.
    `per[e]`: tokens per replica of e; `loads[g]`: device tokens; `dev_of[flat slot]`: its device."""
    flat = a.reshape(-1)
    num_devices, slots = a.shape
    cur = _key(loads)
    best_key, best_move = cur, None
    top = np.flatnonzero(loads >= cur[0] - _TOL * max(cur[0], 1.0))
    phy_per = per[flat]
    for g1 in top:  # a swap that can lower the busiest device involves it
        for s1 in range(slots):
            e1, p1 = a[g1, s1], per[a[g1, s1]]
            # swaps: g1 gets p2 instead of p1, g2 gets p1 instead of p2
            idx = np.flatnonzero((dev_of != g1) & (flat != e1))
            if len(idx):
                delta = phy_per[idx] - p1
                new = np.broadcast_to(loads, (len(idx), num_devices)).copy()
                new[:, g1] += delta
                new[np.arange(len(idx)), dev_of[idx]] -= delta
                keys = np.column_stack([new.max(axis=1), (new ** 2).sum(axis=1)])
                j = int(np.lexsort((keys[:, 1], keys[:, 0]))[0])
                k = (float(keys[j, 0]), float(keys[j, 1]))
                if _better(k, best_key):
                    best_key, best_move = k, ("swap", g1, s1, int(idx[j]))
    return best_key, best_move


def _best_reassign(a: np.ndarray, load: np.ndarray, cnt: np.ndarray, per: np.ndarray, loads: np.ndarray,
                   dev_of: np.ndarray, best_key, best_move):
    """The best re-assignment if it beats `best_key`, else `(best_key, best_move)` unchanged.

    All slots at once: slot p's replica of e1 goes (e1 keeps cnt-1), a replica of e2 takes its
    place; that changes every device holding e1 or e2, so any slot may help."""
    flat = a.reshape(-1)
    num_experts = len(load)
    ps = np.flatnonzero(cnt[flat] >= 2)
    if not len(ps):
        return best_key, best_move
    copies = np.zeros((num_experts, a.shape[0]))  # physical replicas of e on g
    np.add.at(copies, (flat, dev_of), 1.0)
    e1s, g1s = flat[ps], dev_of[ps]
    rows = np.arange(len(ps))
    base = loads[None, :] + copies[e1s] * (load[e1s] / (cnt[e1s] - 1) - per[e1s])[:, None]
    base[rows, g1s] -= load[e1s] / (cnt[e1s] - 1)
    new = base[:, None, :] + (copies * (load / (cnt + 1) - per)[:, None])[None]  # [slot, e2, device]
    new[rows, :, g1s] += (load / (cnt + 1))[None, :]
    mx = new.max(axis=2)
    sq = (new ** 2).sum(axis=2)
    mx[rows, e1s] = np.inf  # e2 == e1 is no move
    order = np.lexsort((sq.reshape(-1), mx.reshape(-1)))[0]
    i, e2 = divmod(int(order), num_experts)
    k = (float(mx[i, e2]), float(sq[i, e2]))
    if _better(k, best_key):
        return k, ("reassign", *divmod(int(ps[i]), a.shape[1]), e2)
    return best_key, best_move


def physical_map(plan: Plan, loads: np.ndarray) -> np.ndarray:
    """`phy2log[layer, device * slots + slot]` for `plan` with its spare slots filled
    (`fill_slots` on `loads[layer, expert]`). Needs the same slot count on every device."""
    if len(set(plan.slots.tolist())) != 1:
        raise InputError("a physical expert map needs the same number of slots on every device; "
                         f"this plan has {sorted(set(plan.slots.tolist()))}")
    loads = np.asarray(loads, dtype=np.float64)
    if loads.shape != (len(plan.layers), plan.num_experts):
        raise InputError(f"loads of shape {loads.shape} do not match the plan's "
                         f"{len(plan.layers)} layers x {plan.num_experts} experts")
    slots = int(plan.slots[0])
    rows = []
    for lp, load in zip(plan.layers, loads):
        assign = lp.assign[:, :slots]
        rows.append(fill_slots(assign, load).reshape(-1))
    return np.stack(rows)


def equal_share_plan(plan: Plan, phy2log: np.ndarray) -> Plan:
    """The plan a framework runs from `phy2log`: equal shares per physical replica (duplicates
    on one device merged), the plan's owners and layer ids."""
    owner = np.stack([lp.owner for lp in plan.layers])
    out = from_eplb(phy2log, plan.num_devices, plan.num_experts, owner=owner)
    for lp, src in zip(out.layers, plan.layers):
        lp.layer_id = src.layer_id
        lp.info = {"solver": "equal-shares", "from": src.info.get("solver", "")}
    return out


def log2phy_of(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's `log2phy[layer, expert, X]` (physical ids in increasing order, -1 padded, X the
    largest replica count, as DeepSeek's `rebalance_experts` sizes it) and `logcnt[layer, expert]`."""
    phy2log = np.atleast_2d(np.asarray(phy2log, dtype=np.int64))
    layers = phy2log.shape[0]
    logcnt = np.stack([np.bincount(r[r != EMPTY], minlength=num_experts) for r in phy2log]).astype(np.int64)
    width = max(int(logcnt.max()), 1)
    log2phy = np.full((layers, num_experts, width), -1, dtype=np.int64)
    for i, row in enumerate(phy2log):
        fill = np.zeros(num_experts, dtype=np.int64)
        for phy, e in enumerate(row.tolist()):
            if e != EMPTY:
                log2phy[i, e, fill[e]] = phy
                fill[e] += 1
    return log2phy, logcnt


def assign_from_counts(phys: np.ndarray, slots: int) -> np.ndarray:
    """`assign[device, slot]` from physical replica counts `phys[expert, device]` (experts in
    increasing order on each device, EMPTY where a device has fewer replicas than slots)."""
    phys = np.asarray(np.rint(phys), dtype=np.int64)
    num_experts, num_devices = phys.shape
    assign = np.full((num_devices, slots), EMPTY, dtype=np.int64)
    for g in range(num_devices):
        ids = np.repeat(np.arange(num_experts), phys[:, g])
        if len(ids) > slots:
            raise InputError(f"device {g} would hold {len(ids)} physical replicas but has {slots} slots")
        assign[g, :len(ids)] = ids
    return assign


def rebalance(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
              solver: str = "greedy", time_budget: float = 1.0) -> np.ndarray:
    """`phy2log[layer, num_replicas]` for the loads `weight[layer, expert]`, for frameworks that
    split an expert's tokens evenly over its physical replicas (DeepSeek EPLB's setting).

    Per layer: FlexMoE's planner (`plan_layer`, objective "balance": the compute makespan, as EPLB
    aims, on `num_gpus` devices in `num_nodes` nodes with `num_replicas / num_gpus` slots each)
    gives a placement; its spare slots are filled (`fill_slots`) and the result is improved for
    equal shares (`balance_equal_shares`). The same search also runs from EPLB's own placement
    (`planner.baselines.eplb_physical`, groups honoured as EPLB does), and the better of the two
    by the busiest GPU's tokens is returned, so the result is never worse than EPLB's there.
    `num_groups` shapes only that EPLB start: FlexMoE's placement does not confine groups to nodes."""
    from cost_models.cluster import INTER, INTRA, Cluster, ComputeModel, Device, ExpertShape, Link
    from planner.baselines import eplb_physical
    from planner.solve import plan_layer

    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise InputError(f"weight must be 2-D [layers, num_logical_experts], got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise InputError("weight must hold finite, non-negative loads")
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                    ("num_gpus", num_gpus)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"{name} must be a whole number >= 1, got {v!r}")
    num_layers, num_experts = w.shape
    if num_gpus % num_nodes:
        raise InputError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_replicas % num_gpus:
        raise InputError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_replicas < num_experts:
        raise InputError(f"num_replicas ({num_replicas}) is fewer than the {num_experts} logical experts")
    slots = num_replicas // num_gpus
    per_node = num_gpus // num_nodes
    devices = tuple(Device(g, g // per_node, "gpu", 2**40, slots, ComputeModel(0.0, 1e-6))
                    for g in range(num_gpus))
    free = Link(0.0, 1e30)
    cluster = Cluster("rebalance_experts", devices, ExpertShape(64, 128, "bf16"),
                      {INTRA: free, INTER: free} if num_nodes > 1 else {INTRA: free})
    groups = num_groups if num_experts % num_groups == 0 else None
    rows = []
    for i in range(num_layers):
        load = w[i]
        lp = plan_layer(cluster, load[None, :], solver=solver, time_budget=time_budget, objective="balance",
                        layer_id=i, reproducible=True)
        ours = balance_equal_shares(fill_slots(lp.assign[:, :slots], load), load)
        start = fill_slots(assign_from_counts(eplb_physical(load, cluster.slots, cluster.node_of, groups), slots),
                           load)
        theirs = balance_equal_shares(start, load)
        best = ours if not _better(_key(equal_share_loads(theirs, load)), _key(equal_share_loads(ours, load))) \
            else theirs
        rows.append(best.reshape(-1))
    return np.stack(rows)

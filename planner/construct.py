"""Constructive plans that exploit uneven token shares, and share balancing for a fixed placement.

Splittable expert loads on devices with few slots are preemptive scheduling with a cardinality
limit. McNaughton's wrap-around rule fills devices in order up to a target time, splitting the
expert that crosses the boundary onto the next device; a binary search finds the smallest target
the slots allow. With few slots, devices that only hold pieces of hot experts would waste their
slots, so each device first takes a few whole light experts and then wraps the heavy ones.
Devices are taken in id order (node by node), so a split expert's replicas mostly share a node
and their synchronisation stays on the fast links.
"""

from __future__ import annotations

import numpy as np

from cost_models.cluster import Cluster

SEARCH_STEPS = 40
SEARCH_TOLERANCE = 1e-3  # relative: a finer target changes no placement that matters


def _wrap(load, order, a, b, slots, target, light):
    """Fill devices in turn up to `target` seconds: first up to `light` whole items from the light
    end of `order`, then items from the heavy end, splitting the one that crosses the target onto
    the next device (McNaughton's wrap-around). Pieces [(expert, device, tokens)] or None when the
    slots run out first. Plain Python lists: this runs inside a binary search."""
    rem = {e: load[e] for e in order}
    pieces = []
    lo, hi = 0, len(order) - 1  # heavy end at lo, light end at hi
    for g in range(len(slots)):
        cap, k, ag, bg = target, slots[g], a[g], b[g]
        for _ in range(min(light, k - 1)):
            if hi <= lo:
                break
            e = order[hi]
            cost = ag + bg * rem[e]
            if cost > cap:
                break
            pieces.append((e, g, rem[e]))
            cap, k, hi = cap - cost, k - 1, hi - 1
        while k > 0 and lo <= hi:
            e = order[lo]
            cost = ag + bg * rem[e]
            if cost <= cap + 1e-15:
                pieces.append((e, g, rem[e]))
                cap, k, lo = cap - cost, k - 1, lo + 1
            else:
                part = (cap - ag) / bg
                if part > 0:
                    pieces.append((e, g, part))
                    rem[e] -= part
                    k -= 1
                break
    return pieces if lo > hi else None


def mcnaughton(cluster: Cluster, load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best wrap-around plan over a few light-item counts per device (0, 1, half and all but
    one of the slots): (x[e, g], share[e, g])."""
    load_arr = np.asarray(load, dtype=np.float64)
    a, b = cluster.compute_a, cluster.compute_b
    lb = max((load_arr.sum() + len(load_arr) * (a / b).min()) / (1.0 / b).sum(), 1e-12)
    order = np.argsort(-load_arr, kind="stable").tolist()
    load, a, b, slots = load_arr.tolist(), a.tolist(), b.tolist(), cluster.slots.tolist()
    best = None
    k = int(max(slots))
    for light in sorted({0, 1, k // 2, k - 1} & set(range(k))):
        hi = lb
        found = _wrap(load, order, a, b, slots, hi, light)
        while found is None and hi < 1e6 * (lb + 1.0):
            hi *= 2.0
            found = _wrap(load, order, a, b, slots, hi, light)
        if found is None:
            continue
        lo = lb * 0.999
        for _ in range(SEARCH_STEPS):
            if hi - lo <= SEARCH_TOLERANCE * hi:
                break
            mid = 0.5 * (lo + hi)
            trial = _wrap(load, order, a, b, slots, mid, light)
            if trial is None:
                lo = mid
            else:
                hi, found = mid, trial
        if best is None or hi < best[0]:
            best = (hi, found)
    x = np.zeros((len(load), len(slots)), dtype=bool)
    y = np.zeros(x.shape)
    for e, g, t in best[1]:
        x[e, g] = True
        y[e, g] += t
    share = np.where(load_arr[:, None] > 0, y / np.maximum(load_arr[:, None], 1e-300),
                     x / np.maximum(x.sum(axis=1, keepdims=True), 1))
    return x, share


def balance_shares(x: np.ndarray, load: np.ndarray, a: np.ndarray, b: np.ndarray, rounds: int = 4,
                   share: np.ndarray | None = None) -> np.ndarray:
    """Shares for a fixed placement that level the devices' compute time, by water-filling one
    replicated expert at a time against the others (coordinate descent)."""
    x = np.asarray(x, bool)
    load = np.asarray(load, dtype=np.float64)
    if share is None:
        share = x / np.maximum(x.sum(axis=1, keepdims=True), 1)
    y = load[:, None] * share
    t = a * x.sum(axis=0) + b * y.sum(axis=0)
    multi = [e for e in np.argsort(-load, kind="stable") if x[e].sum() > 1 and load[e] > 0]
    for _ in range(rounds):
        for e in multi:
            devs = np.flatnonzero(x[e])
            base = t[devs] - b[devs] * y[e, devs]
            new = _water(base, b[devs], load[e])
            t[devs] = base + b[devs] * new
            y[e, devs] = new
    return np.where(load[:, None] > 0, y / np.maximum(load[:, None], 1e-300), share)


def _water(base: np.ndarray, b: np.ndarray, amount: float) -> np.ndarray:
    """Pour `amount` tokens over devices at times `base` (seconds per token `b`) to a common level."""
    order = np.argsort(base, kind="stable")
    bs, ws = base[order], 1.0 / b[order]
    level = bs[0]
    for j in range(len(bs)):
        # raise the level over the first j+1 devices until it reaches the next device's base
        cap = np.sum((bs[j + 1] - bs[:j + 1]) * ws[:j + 1]) if j + 1 < len(bs) else np.inf
        if cap >= amount:
            level = (amount + np.sum(bs[:j + 1] * ws[:j + 1])) / np.sum(ws[:j + 1])
            break
    out = np.zeros(len(bs))
    out[order] = np.clip((level - bs) * ws, 0.0, None)
    s = out.sum()
    return out * (amount / s) if s > 0 else out

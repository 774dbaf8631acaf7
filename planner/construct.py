"""Constructive plans that exploit uneven token shares, and share balancing for a fixed placement.

Splittable expert loads on devices with few slots are preemptive scheduling with a cardinality
limit. McNaughton's wrap-around rule fills devices in order up to a target time, splitting the
expert that crosses the boundary onto the next device; a binary search finds the smallest target
the slots allow. With few slots, devices that only hold pieces of hot experts would waste their
slots, so each device first takes a few whole light experts and then wraps the heavy ones.
Devices are taken in id order (node by node), so a split expert's replicas mostly share a node
and their synchronisation stays on the fast links.

On several nodes `hierarchical` decides nodes first (which experts each node hosts, how many of
each expert's tokens it serves: its own sources' demand where it can), then devices inside each
node, because the estimator routes a node's tokens to replicas on that node before any cross the
slow inter-node links.
"""

from __future__ import annotations

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import A2A_PHASES, SYNC_PHASES

SEARCH_STEPS = 40
SEARCH_TOLERANCE = 1e-3  # relative: a finer target changes no placement that matters


def inter_sync_s(cluster: Cluster) -> float:
    """Seconds one follower replica's sync (both phases) costs over the inter-node link class (0
    on one node): what node-first layouts charge a replica of an expert served on several nodes."""
    return SYNC_PHASES * cluster.expert.param_bytes / cluster.links["inter"].beta if "inter" in cluster.links else 0.0


def _wrap(load, a, b, slots, target, light, pieces: list | None = None) -> bool:
    """Fill devices in turn up to `target` seconds: first up to `light` whole items from the light
    end of `load` (items heaviest first), then items from the heavy end, splitting the one that
    crosses the target onto the next device (McNaughton's wrap-around). True when every item fits
    before the slots run out; the pieces (item's position in `load`, device, tokens) are appended
    to `pieces` if given: the binary search only asks whether a target fits, then the best target
    is filled once more for its pieces. Plain Python lists and locals: this runs inside a binary
    search (items by position, not through an index list: a third faster)."""
    rem = load[:]
    keep = pieces is not None
    lo, hi = 0, len(rem) - 1  # heavy end at lo, light end at hi
    g = 0
    for k in slots:
        cap, ag, bg = target, a[g], b[g]
        light_left = light if light < k - 1 else k - 1
        while light_left > 0 and hi > lo:
            cost = ag + bg * rem[hi]
            if cost > cap:
                break
            if keep:
                pieces.append((hi, g, rem[hi]))
            cap -= cost
            k -= 1
            light_left -= 1
            hi -= 1
        while k > 0 and lo <= hi:
            r = rem[lo]
            cost = ag + bg * r
            if cost <= cap + 1e-15:
                if keep:
                    pieces.append((lo, g, r))
                cap -= cost
                k -= 1
                lo += 1
            else:
                part = (cap - ag) / bg
                if part > 0:
                    if keep:
                        pieces.append((lo, g, part))
                    rem[lo] = r - part
                break
        g += 1
    return lo > hi


def mcnaughton(cluster: Cluster, load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best wrap-around plan over a few light-item counts per device (0, 1, half and all but
    one of the slots): (x[e, g], share[e, g])."""
    load_arr = np.asarray(load, dtype=np.float64)
    x, share = wrap_tokens(load_arr, cluster.compute_a, cluster.compute_b, cluster.slots)
    share /= np.maximum(load_arr[:, None], 1e-300)  # tokens to shares, in place (fresh [E, G] arrays page fault)
    idle = np.flatnonzero(load_arr <= 0)  # experts without tokens: even shares over their replicas
    share[idle] = x[idle] / np.maximum(x[idle].sum(axis=1, keepdims=True), 1)
    return x, share


def wrap_tokens(load_arr: np.ndarray, a: np.ndarray, b: np.ndarray, slots: np.ndarray,
                lights=None) -> tuple[np.ndarray, np.ndarray]:
    """Wrap-around on the devices given by arrays `a`, `b`, `slots`: (x[e, g], tokens[e, g]).
    `lights`: light-item counts to try (default 0, 1, half and all but one of the slots)."""
    # Python floats, not numpy scalars, in the search: the same IEEE arithmetic, several times faster
    lb = float(max((load_arr.sum() + len(load_arr) * (a / b).min()) / (1.0 / b).sum(), 1e-12))
    order = np.argsort(-load_arr, kind="stable")
    load, a, b, slots = load_arr[order].tolist(), np.asarray(a).tolist(), np.asarray(b).tolist(), np.asarray(slots).tolist()
    best = None  # (target, light) of the best fit found
    k = int(max(slots))
    # most light items first (usually the best), and a light count that cannot beat the best
    # target so far, less the search's tolerance, is dropped after that one trial
    for light in sorted(set(lights if lights is not None else {0, 1, k // 2, k - 1}) & set(range(k)), reverse=True):
        hi = lb if best is None else best[0] * (1 - SEARCH_TOLERANCE)
        lo = lb * 0.999  # nothing fits under the balance bound
        fits = _wrap(load, a, b, slots, hi, light)
        excess = 1.0 / 16
        # the first light count: up to a fit, in growing steps over the bound (the best target is
        # mostly a few percent over it: a narrow bracket spares the bisection a few fills)
        while not fits and best is None and hi < 1e6 * (lb + 1.0):
            lo, hi = hi, lb * (1.0 + excess)
            excess *= 2.0
            fits = _wrap(load, a, b, slots, hi, light)
        if not fits:
            continue
        for _ in range(SEARCH_STEPS):
            if hi - lo <= SEARCH_TOLERANCE * hi:
                break
            mid = 0.5 * (lo + hi)
            if _wrap(load, a, b, slots, mid, light):
                hi = mid
            else:
                lo = mid
        if best is None or hi < best[0]:
            best = (hi, light)
    pieces = []
    _wrap(load, a, b, slots, best[0], best[1], pieces)
    x = np.zeros((len(load), len(slots)), dtype=bool)
    y = np.zeros(x.shape)
    pos, gs, ts = zip(*pieces)  # each (item, device) at most once: a device takes an item once
    es = order[list(pos)]
    x[es, gs] = True
    y[es, gs] = ts
    return x, y


def balance_shares(x: np.ndarray, load: np.ndarray, a: np.ndarray, b: np.ndarray, rounds: int = 4,
                   share: np.ndarray | None = None, base: np.ndarray | None = None) -> np.ndarray:
    """Shares for a fixed placement that level the devices' compute time (plus `base` seconds per
    device, if given), by water-filling one replicated expert at a time against the others
    (coordinate descent). Plain Python floats inside: an expert has a few replicas, too few for
    numpy calls to pay."""
    x = np.asarray(x, bool)
    load = np.asarray(load, dtype=np.float64)
    if share is None:
        share = x / np.maximum(x.sum(axis=1, keepdims=True), 1)
    y = load[:, None] * share
    t = (a * x.sum(axis=0) + b * y.sum(axis=0) + (0.0 if base is None else base)).tolist()
    bl = np.asarray(b, dtype=np.float64).tolist()
    reps = x.sum(axis=1)
    multi = [e for e in np.argsort(-load, kind="stable").tolist() if reps[e] > 1 and load[e] > 0]
    devs = {e: np.flatnonzero(x[e]).tolist() for e in multi}
    ys = {e: y[e, devs[e]].tolist() for e in multi}
    bds = {e: [bl[g] for g in devs[e]] for e in multi}
    amounts = {e: float(load[e]) for e in multi}
    for _ in range(rounds):
        for e in multi:
            dv, bd = devs[e], bds[e]
            rest = [t[g] - bg * yg for g, bg, yg in zip(dv, bd, ys[e])]
            ys[e] = _water(rest, bd, amounts[e])
            for g, r, bg, yg in zip(dv, rest, bd, ys[e]):
                t[g] = r + bg * yg
    for e in multi:
        y[e, devs[e]] = ys[e]
    return np.where(load[:, None] > 0, y / np.maximum(load[:, None], 1e-300), share)


def _water(base, b, amount: float) -> list:
    """Pour `amount` tokens over devices at times `base` (seconds per token `b`) to a common level:
    the tokens per device, a list. Sequences of Python floats in and out (a few devices). Each sum
    adds as `_sum` does, written out left to right where it has fewer than eight terms (as `_sum`
    then adds): refine levels shares for every candidate, and lists and calls cost more than the
    arithmetic."""
    n = len(base)
    order = sorted(range(n), key=base.__getitem__)  # stable, as argsort(kind="stable")
    bs, ws = [base[i] for i in order], [1.0 / b[i] for i in order]
    level = bs[0]
    for j in range(n):
        m = j + 1  # raise the level over the first m devices until it reaches the next one's base
        if m == n:
            cap = np.inf
        elif m < 8:
            top, cap = bs[m], 0.0
            for k in range(m):
                cap += (top - bs[k]) * ws[k]
        else:
            cap = _sum([(bs[m] - bs[k]) * ws[k] for k in range(m)])
        if not cap >= amount:
            continue
        if m < 8:
            sb = sw = 0.0
            for k in range(m):
                sb += bs[k] * ws[k]
            for k in range(m):
                sw += ws[k]
        else:
            sb, sw = _sum([bs[k] * ws[k] for k in range(m)]), _sum(ws[:m])
        level = (amount + sb) / sw
        break
    out = [0.0] * n
    for k, i in enumerate(order):
        v = (level - bs[k]) * ws[k]
        out[i] = 0.0 if 0.0 > v else v  # max(v, 0.0), to the sign of a zero
    if n < 8:
        s = 0.0
        for v in out:
            s += v
    else:
        s = _sum(out)
    return [v * (amount / s) for v in out] if s > 0 else out


def _sum(v: list) -> float:
    """Sum as numpy's `np.sum` of a float64 array adds (pairwise, in blocks of eight, up to 128
    items), so that these list loops give the same plans to the last bit as array code."""
    n = len(v)
    if n < 8:
        s = 0.0
        for a in v:
            s += a
        return s
    if n > 128:
        return float(np.sum(v))
    r = v[:8]
    m = n - n % 8
    for i in range(8, m, 8):
        for k in range(8):
            r[k] += v[i + k]
    s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for i in range(m, n):
        s += v[i]
    return s


def hierarchical(cluster: Cluster, counts: np.ndarray, extras=None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Node-aware plans, nodes first and then devices: [(name, x[e, g], share[e, g])].

    Inter-node links are an order of magnitude slower than the links inside a node, and routing
    sends a source's tokens to replicas on its own node first. So each node hosts the experts its
    own sources want most and serves (close to) its own demand of them: those tokens never cross.
    `extras` is how many (expert, node) hostings beyond one per expert to allow (each such
    replica costs a weight sync over the slow link, so the estimator decides how many pay);
    default a few counts up to what the slots allow. Per variant:
    1. hostings, within each node's budget (its share of `experts + extras`; the slots left over
       serve to split experts inside the node): every expert a home node, heaviest first onto
       the node with the least work, then the extras to the (expert, node) pairs with the most
       node demand;
    2. node shares: a hosting node serves its own demand; demand of nodes without a replica goes
       to the hosting nodes by water-filling their work; then shares of multi-node experts shift
       from the busiest node to the idlest until node work is proportional to node speed;
    3. inside each node, `pack_node` places the node's tokens on its devices, counting the weight
       sync that each multi-node expert's replica pays over the slow link.
    """
    counts = np.asarray(counts, dtype=np.float64)
    node, num_nodes = cluster.node_index, cluster.num_nodes
    E = counts.shape[1]
    load = counts.sum(axis=0)
    if num_nodes < 2 or E == 0:
        return []
    onehot = cluster.node_onehot
    demand = counts.T @ onehot  # [E, K]
    a, b, slots = cluster.compute_a, cluster.compute_b, cluster.slots
    node_slots = slots @ onehot
    speed = (1.0 / b) @ onehot  # tokens per second of each node
    spare = int(node_slots.sum()) - E
    if spare < 0:
        return []
    if extras is None:
        extras = sorted({0, spare} | {v for v in (1, 2, 4, 8, 16, 32) if v < spare} | {spare // 2})
    sync_s = inter_sync_s(cluster)
    out = []
    for extra in extras:
        budget = _budgets(node_slots, E + int(extra))
        if budget is None:
            continue
        host = _hostings(demand, load, budget, speed)
        y = _node_shares(host, demand, load, speed)
        x = np.zeros((E, len(node)), dtype=bool)
        tok = np.zeros(x.shape)
        cross = host.sum(axis=1) > 1  # replicas that sync over the slow link
        for k in range(num_nodes):
            devs = np.flatnonzero(node == k)
            ex = np.flatnonzero(host[:, k] & ((y[:, k] > 0) | (host.sum(axis=1) == 1)))
            if not len(ex):
                continue
            sx, sy = pack_node(y[ex, k], np.where(cross[ex], sync_s, 0.0), a[devs], b[devs], slots[devs])
            x[np.ix_(ex, devs)] = sx
            tok[np.ix_(ex, devs)] = sy
        share = np.where(load[:, None] > 0, tok / np.maximum(load[:, None], 1e-300),
                         x / np.maximum(x.sum(axis=1, keepdims=True), 1))
        out.append((f"nodes+{int(extra)}", x, share))
    return out


def demand_split(cluster: Cluster, counts: np.ndarray, units: float):
    """A node-level plan that serves each node's demand of an expert on that node where the tokens
    would otherwise cost more to send across than replica sync does: (replicas[e, k], owner_node[e],
    tokens[e, k]), the inputs of `from_nodes` and `refine.realise`.

    An expert is hosted on every node whose own sources route it at least `units` weight syncs'
    worth of tokens (a token crossing costs `A2A_PHASES * token_bytes` there, a follower's sync
    `SYNC_PHASES * param_bytes`), and each hosting node serves its own demand (the demand of nodes
    without a replica goes to its hosts in proportion to theirs). The other experts get one home,
    heaviest first onto the node with the least work per speed among those with hostings left
    (hostings per node in proportion to its slots). A node's slots beyond one per hosted expert go
    to its experts with the most tokens per replica. Owner nodes of the experts served on several
    nodes are chosen, most replicas first, to keep the busiest node's inter-node sync (the larger
    of the followers it hosts and the remote followers of the experts it owns) lowest: realised
    devices can then pair an owner's receipts with a follower's sends. None if the hostings do not
    fit the nodes' slots."""
    counts = np.asarray(counts, dtype=np.float64)
    K = cluster.num_nodes
    load = counts.sum(axis=0)
    E = len(load)
    onehot = cluster.node_onehot
    demand = counts.T @ onehot  # [E, K]
    node_slots = (cluster.slots @ onehot).astype(np.int64)
    devices = onehot.sum(axis=0).astype(np.int64)
    speed = (1.0 / cluster.compute_b) @ onehot
    worth = units * SYNC_PHASES * cluster.expert.param_bytes / (A2A_PHASES * cluster.expert.token_bytes)
    host = demand >= max(worth, 1e-12)
    host[host.sum(axis=1) < 2] = False  # one hosting node: a single home, placed below
    # more hostings than slots: experts stop being split, the one with the least demand on a
    # hosting node first (each then gets one home below)
    for i in np.argsort(np.where(host, demand, np.inf), axis=None, kind="stable"):
        if host.sum() + (~host.any(axis=1)).sum() <= node_slots.sum():
            break
        host[int(i) // K] = False
    split = host.any(axis=1)
    budget = _budgets(node_slots, int(host.sum() + (~split).sum()))
    if budget is None:
        return None
    tokens = np.where(host, demand, 0.0)
    served = tokens.sum(axis=1)
    tokens *= 1.0 + np.divide(load - served, served, out=np.zeros(E), where=served > 0)[:, None]
    work = tokens.sum(axis=0)
    for e in np.argsort(-load, kind="stable"):
        if split[e]:
            continue
        room = host.sum(axis=0) < budget
        if not room.any():
            return None
        k = int(np.argmin(np.where(room, work / speed - 1e-12 * demand[e], np.inf)))
        host[e, k], tokens[e, k] = True, load[e]
        work[k] += load[e]
    if (host.sum(axis=0) > node_slots).any():
        return None
    n = host.astype(np.int64)
    for k in range(K):
        for _ in range(int(node_slots[k] - n[:, k].sum())):
            per = np.where(n[:, k] < devices[k], tokens[:, k] / np.maximum(n[:, k], 1), -1.0)
            e = int(np.argmax(per))
            if per[e] <= 0:
                break
            n[e, k] += 1
    owner_node = np.argmax(host, axis=1)
    hosted, owed = np.zeros(K), np.zeros(K)  # per node: followers hosted / remote followers owed
    for e in sorted(np.flatnonzero(split).tolist(), key=lambda e: (-int(n[e].sum()), e)):
        best = None
        for k in np.flatnonzero(host[e]).tolist():
            h, o = hosted + n[e], owed.copy()
            h[k] -= n[e, k]
            o[k] += n[e].sum() - n[e, k]
            worst = float(np.maximum(h, o).max())
            if best is None or worst < best[0]:
                best = (worst, k, h, o)
        _, owner_node[e], hosted, owed = best
    return n, owner_node, tokens


def _budgets(node_slots: np.ndarray, hostings: int):
    """Hostings per node, in proportion to the node's slots, none over them; None if impossible."""
    if hostings > node_slots.sum():
        return None
    raw = hostings * node_slots / node_slots.sum()
    out = np.minimum(np.floor(raw).astype(np.int64), node_slots.astype(np.int64))
    for k in np.argsort(-(raw - out), kind="stable"):
        if out.sum() >= hostings:
            break
        if out[k] < node_slots[k]:
            out[k] += 1
    while out.sum() < hostings:  # proportional rounding left some short: fill any room
        out[int(np.argmax(node_slots - out))] += 1
    return out


def _hostings(demand: np.ndarray, load: np.ndarray, budget: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """host[e, k]. Every expert first gets a home node, heaviest expert first onto the node with
    the least work per speed that has budget left (ties: the node that wants it most); the
    remaining budget goes to the (expert, node) pairs with the most node demand."""
    E, K = demand.shape
    host = np.zeros((E, K), dtype=bool)
    left = budget.astype(np.int64).copy()
    homes = np.minimum(_budgets(budget, E), left)  # homes spread like the budget, so extras are too
    work = np.zeros(K)
    for e in np.argsort(-load, kind="stable"):
        ok = np.flatnonzero((left > 0) & (homes > 0))
        if not len(ok):
            ok = np.flatnonzero(left > 0)
        key = work[ok] / speed[ok] - 1e-12 * demand[e, ok]
        k = int(ok[np.argmin(key)])
        host[e, k] = True
        left[k] -= 1
        homes[k] -= 1
        work[k] += load[e]
    for i in np.argsort(-demand, axis=None, kind="stable"):
        if not left.any():
            break
        e, k = divmod(int(i), K)
        if left[k] > 0 and not host[e, k] and demand[e, k] > 0:
            host[e, k] = True
            left[k] -= 1
    return host


def _node_shares(host: np.ndarray, demand: np.ndarray, load: np.ndarray, speed: np.ndarray,
                 rounds: int = 64) -> np.ndarray:
    """y[e, k] tokens each hosting node serves: its own demand; the demand of nodes without a
    replica water-filled over the hosts; then shifts between hosts to balance node time."""
    y = np.where(host, demand, 0.0)
    orphan = load - y.sum(axis=1)
    work = y.sum(axis=0)
    for e in np.argsort(-orphan, kind="stable"):
        if orphan[e] <= 0:
            continue
        ks = np.flatnonzero(host[e])
        if len(ks) == 1:
            y[e, ks] += orphan[e]
            work[ks] += orphan[e]
            continue
        add = np.asarray(_water((work[ks] / speed[ks]).tolist(), (1.0 / speed[ks]).tolist(), float(orphan[e])))
        y[e, ks] += add
        work[ks] += add
    target = load.sum() * speed / speed.sum()
    for _ in range(rounds):
        over = (work - target) / speed
        hi, lo = int(np.argmax(over)), int(np.argmin(over))
        need = min(work[hi] - target[hi], target[lo] - work[lo])
        if need <= 1e-9 * max(load.sum(), 1.0):
            break
        both = np.flatnonzero(host[:, hi] & host[:, lo] & (y[:, hi] > 0))
        if not len(both):
            break
        for e in both[np.argsort(-y[both, hi], kind="stable")]:  # biggest first: fewest experts touched
            m = min(need, y[e, hi])
            y[e, hi] -= m
            y[e, lo] += m
            work[hi] -= m
            work[lo] += m
            need -= m
            if need <= 0:
                break
    return y


def pack_node(load: np.ndarray, fixed: np.ndarray, a: np.ndarray, b: np.ndarray,
              slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x[e, g], tokens[e, g]) for items `load` on one node's devices; `fixed[e]` seconds an item
    costs the device holding it whatever its tokens (its weight sync over the slow link). The
    better of wrap-around (many splits) and replicate-then-pack-then-level (few spare slots: spare
    slots to the items with the most seconds per replica, heaviest replica first onto the least
    busy device with room, then shares levelled)."""
    found = []
    if len(load) <= slots.sum():
        found.append(wrap_tokens(load, a, b, slots, lights=(0, 1)))
    reps = np.ones(len(load), dtype=np.int64)
    for _ in range(int(slots.sum()) - len(load)):
        reps[int(np.argmax((load * b.mean() + fixed) / reps))] += 1
    reps = np.minimum(reps, len(slots))
    x = np.zeros((len(load), len(slots)), dtype=bool)
    t = np.zeros(len(slots))
    used = np.zeros(len(slots), dtype=np.int64)
    items = [(float(load[e] * b.mean() / reps[e] + fixed[e]), int(e)) for e in range(len(load)) for _ in range(reps[e])]
    for _, e in sorted(items, key=lambda v: (-v[0], v[1])):
        ok = np.flatnonzero((used < slots) & ~x[e])
        if not len(ok):
            continue
        g = int(ok[np.argmin(t[ok])])
        x[e, g] = True
        used[g] += 1
        t[g] += a[g] + b[g] * load[e] / reps[e] + fixed[e]
    if x.any(axis=1).all():
        base = (x * fixed[:, None]).sum(axis=0)
        share = balance_shares(x, load, a, b, base=base)
        found.append((x, share * load[:, None]))
    best, best_t = None, np.inf
    for fx, fy in found:
        tt = (a * fx.sum(axis=0) + b * fy.sum(axis=0) + (fx * fixed[:, None]).sum(axis=0)).max()
        if tt < best_t:
            best, best_t = (fx, fy), tt
    return best


def spread_owners(cluster: Cluster, x: np.ndarray, base: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Owners for the experts with replicas on several nodes, chosen so that their weight sync
    (the owner pays a replica's bytes per follower and phase, each follower the same, over the
    link between them: seconds `SYNC_PHASES * param_bytes / beta`) lands on devices with time to spare. `base[g]`: the
    device's seconds without sync; `owner`: the owners to keep for the other experts. Greedy,
    experts with the most replicas first; ties to the lowest device id."""
    x = np.asarray(x, bool)
    owner = np.asarray(owner).copy()
    cost = SYNC_PHASES * cluster.expert.param_bytes * cluster.inv_beta  # [follower, owner] seconds, symmetric here
    node = cluster.node_of
    cross = np.array([len(set(node[x[e]].tolist())) > 1 for e in range(x.shape[0])])
    sync = np.zeros(x.shape[1])
    for e in np.flatnonzero(~cross):  # the others keep their owners: count their sync first
        f = np.flatnonzero(x[e])
        f = f[f != owner[e]]
        sync[f] += cost[f, owner[e]]
        sync[owner[e]] += cost[f, owner[e]].sum()
    for e in sorted(np.flatnonzero(cross), key=lambda e: (-int(x[e].sum()), int(e))):
        reps = np.flatnonzero(x[e])
        best, best_t = None, np.inf
        for o in reps:
            f = reps[reps != o]
            t = base[f] + sync[f] + cost[f, o]
            worst = max(float(t.max(initial=0.0)), float(base[o] + sync[o] + cost[f, o].sum()))
            if worst < best_t - 1e-15:
                best, best_t = int(o), worst
        f = reps[reps != best]
        sync[f] += cost[f, best]
        sync[best] += cost[f, best].sum()
        owner[e] = best
    return owner


def node_counts(cluster: Cluster, replicas: np.ndarray, owner_node: np.ndarray) -> np.ndarray | None:
    """`replicas[e, k]` of a node-level plan with the owner node holding at least one, or None when
    a node cannot hold them (more than its slots, or more of one expert than it has devices)."""
    n = np.asarray(replicas, dtype=np.int64).copy()
    rows = np.arange(len(n))
    n[rows, owner_node] = np.maximum(n[rows, owner_node], 1)
    for k, devs in enumerate(cluster.node_devices):
        if n[:, k].sum() > cluster.slots[devs].sum() or (n[:, k] > len(devs)).any():
            return None
    return n


def from_nodes(cluster: Cluster, counts: np.ndarray, tokens: np.ndarray, owner_node: np.ndarray):
    """A device plan from a node-level one (`tokens[e, k]` each node serves, `owner_node[e]`):
    `pack_node` inside each node, counting the weight sync of experts served on several nodes;
    the owner is the replica on the owner node with the most tokens. (x, share, owner)."""
    counts = np.asarray(counts, dtype=np.float64)
    node = cluster.node_index
    load = counts.sum(axis=0)
    E, G = len(load), cluster.num_devices
    a, b, slots = cluster.compute_a, cluster.compute_b, cluster.slots
    host = tokens > 1e-9 * max(load.max(), 1.0)
    host[np.arange(E), owner_node] = True  # the owner node keeps a replica
    sync_s = inter_sync_s(cluster)
    cross = host.sum(axis=1) > 1
    x = np.zeros((E, G), dtype=bool)
    tok = np.zeros((E, G))
    for k in range(host.shape[1]):
        devs = np.flatnonzero(node == k)
        ex = np.flatnonzero(host[:, k])
        if not len(ex):
            continue
        if len(ex) > slots[devs].sum():
            return None
        sx, sy = pack_node(tokens[ex, k], np.where(cross[ex], sync_s, 0.0), a[devs], b[devs], slots[devs])
        x[np.ix_(ex, devs)] = sx
        tok[np.ix_(ex, devs)] = sy
    if not x.any(axis=1).all():
        return None
    share = np.where(load[:, None] > 0, tok / np.maximum(load[:, None], 1e-300), x / np.maximum(x.sum(1, keepdims=True), 1))
    share = np.where(x, share, 0.0)
    share = share / np.maximum(share.sum(axis=1, keepdims=True), 1e-300)
    share = np.where(share.sum(axis=1, keepdims=True) > 0, share, x / np.maximum(x.sum(1, keepdims=True), 1))
    owner = np.array([int(np.flatnonzero(x[e] & (node == owner_node[e]))[np.argmax(tok[e, x[e] & (node == owner_node[e])])])
                      if (x[e] & (node == owner_node[e])).any() else int(np.flatnonzero(x[e])[0]) for e in range(E)])
    return x, share, owner

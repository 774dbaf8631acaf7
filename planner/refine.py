"""Local search on a device plan, every candidate judged by the estimator itself.

The solvers search with proxies (even shares, linearised routing, owners fixed, whole nodes
summed), and the plans they return leave some devices carrying communication the proxies did
not see: an owner receiving every follower's gradients, a device sending most of its tokens
across nodes. Here a candidate is scored by `cost_models.estimator` after its shares are
levelled so that every device's whole step (compute + all-to-all + sync) reaches one level
(`level_shares`). Candidates: hand an expert's optimizer state to another of its replicas, swap
two replicas between devices of one node, or move a replica to a free slot of its node. Devices
that spend most on communication are tried first; the first improvement is taken, until a
local optimum, the deadline or the evaluation limit (each scan starts where the last improvement
was found). About 0.8 ms per candidate at 32 experts on 16 devices, so it runs where
there is time: the offline solve, and half the online ILP's budget after its hints.
"""

from __future__ import annotations

import time

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import Breakdown, estimate
from planner.construct import balance_shares, demand_split, from_nodes, inter_sync_s, node_counts
from planner.plan import LayerPlan
from planner.score import Verdict, clean_shares, migration_s

MIN_GAIN = 1e-9  # seconds: a candidate must beat the incumbent by this to be taken
# `split_plans`' thresholds, in weight syncs' worth of tokens a node routes to an expert: on the
# real excerpt each of them gives the best levelled plan on some instances
SPLIT_UNITS = (0.25, 0.5, 1.0)


def level_shares(cluster: Cluster, counts: np.ndarray, x: np.ndarray, owner: np.ndarray, share: np.ndarray,
                 rounds: int = 2, within_nodes: bool = False) -> tuple[np.ndarray, Breakdown]:
    """(shares, their estimate): compute levelled against the rest of each device's step
    (all-to-all and sync at the last estimate); routing follows the shares, so a few rounds,
    keeping the best estimate (the given shares included; levelling against the parent plan's
    communication instead, to save their estimate, finds worse plans). `within_nodes`: each round
    also tries levelling inside each node only, every node serving as many of each expert's
    tokens as before, which keeps a node structure's traffic where it was."""
    load = counts.sum(axis=0)
    best = (share, estimate(cluster, counts, x, share, owner))
    base = best[1].a2a + best[1].sync
    for _ in range(rounds):
        tries = [_level_nodes(cluster, x, load, share, base)] if within_nodes else []
        tries.append(clean_shares(x, balance_shares(x, load, cluster.compute_a, cluster.compute_b, share=share,
                                                    base=base)))
        share, est = min(((t, estimate(cluster, counts, x, t, owner)) for t in tries), key=lambda r: r[1].step_time)
        if est.step_time < best[1].step_time:
            best = (share, est)
        base = est.a2a + est.sync
    return best


def _level_nodes(cluster: Cluster, x: np.ndarray, load: np.ndarray, share: np.ndarray, base: np.ndarray):
    """`balance_shares` inside each node, on the tokens of each expert the node serves now."""
    tok = load[:, None] * share
    out = tok.copy()
    for devs in cluster.node_devices:
        t, xk = tok[:, devs], x[:, devs]
        served = t.sum(axis=1)
        sk = balance_shares(xk, served, cluster.compute_a[devs], cluster.compute_b[devs],
                            share=clean_shares(xk, t / np.maximum(served[:, None], 1e-300)), base=base[devs])
        out[:, devs] = sk * served[:, None]
    return clean_shares(x, out / np.maximum(load[:, None], 1e-300))


def _moves(cluster: Cluster, x: np.ndarray, owner: np.ndarray, est: Breakdown):
    """Candidate changes, most promising first: ("owner", e, g), ("swap", e1, g1, e2, g2),
    ("move", e, g_from, g_to)."""
    for e in np.flatnonzero(x.sum(axis=1) > 1).tolist():
        for g in np.flatnonzero(x[e]).tolist():
            if g != owner[e]:
                yield ("owner", e, g)
    node = cluster.node_index
    free = (cluster.slots - x.sum(axis=0)).tolist()
    order = np.argsort(-(est.a2a + est.sync), kind="stable").tolist()
    held = {g: np.flatnonzero(x[:, g]).tolist() for g in order}
    for i, g1 in enumerate(order):
        for g2 in order[i + 1:]:
            if node[g1] != node[g2]:
                continue
            for e1 in held[g1]:
                if x[e1, g2]:
                    continue
                if free[g2] > 0:
                    yield ("move", e1, g1, g2)
                for e2 in held[g2]:
                    if not x[e2, g1]:
                        yield ("swap", e1, g1, e2, g2)
            if free[g1] > 0:
                for e2 in held[g2]:
                    if not x[e2, g1]:
                        yield ("move", e2, g2, g1)


def _relocate(x, share, owner, e, src, dst):
    """Replica of `e` from device `src` to `dst`, with its share and, if it owned `e`, the ownership."""
    x[e, src], x[e, dst] = False, True
    share[e, dst], share[e, src] = share[e, src], 0.0
    if owner[e] == src:
        owner[e] = dst


def _apply(move, x, share, owner):
    x, share, owner = x.copy(), share.copy(), owner.copy()
    if move[0] == "owner":
        owner[move[1]] = move[2]
    elif move[0] == "swap":
        _, e1, g1, e2, g2 = move
        _relocate(x, share, owner, e1, g1, g2)
        _relocate(x, share, owner, e2, g2, g1)
    else:
        _relocate(x, share, owner, *move[1:])
    return x, share, owner


def refine(cluster: Cluster, counts: np.ndarray, current: LayerPlan | None, interval: int, x, share, owner, *,
           seconds: float | None = None, max_evals: int | None = None,
           within_nodes: bool = False) -> tuple[np.ndarray, Verdict, int]:
    """(x, the estimator's `Verdict` on the refined plan, candidates evaluated). Never worse than
    the plan given with levelled shares. `seconds` bounds the wall time (the result then depends
    on the machine's speed), `max_evals` the work (reproducible); neither: until a local optimum.
    `within_nodes`: see `level_shares` (about twice the time per candidate; for plans made from a
    node structure)."""
    t_end = None if seconds is None else time.perf_counter() + seconds
    counts = np.asarray(counts, dtype=np.float64)
    x, owner = np.asarray(x, bool).copy(), np.asarray(owner).copy()
    share, est = level_shares(cluster, counts, x, owner, clean_shares(x, share), 3, within_nodes)
    mig = migration_s(cluster, current, x, owner, interval)
    evals, start = 0, 0
    while True:
        found, moves = None, list(_moves(cluster, x, owner, est))
        # the scan goes on from where the last improvement was found, not from the top: the
        # candidates before it were just tried and mostly still fail
        for i in range(start, start + len(moves)):
            if (t_end is not None and time.perf_counter() > t_end) or (max_evals is not None and evals >= max_evals):
                break
            move = moves[i % len(moves)]
            nx, ns, no = _apply(move, x, share, owner)
            ns, ne = level_shares(cluster, counts, nx, no, ns, 1, within_nodes)
            nm = migration_s(cluster, current, nx, no, interval)
            evals += 1
            if ne.step_time + nm < est.step_time + mig - MIN_GAIN:
                found, start = (nx, ns, no, ne, nm), i % len(moves)
                break
        if found is None:
            break
        x, share, owner, est, mig = found
    return x, Verdict(share, owner, est, mig), evals


class ForkedRefines:
    """`refine` of some starts, each in a forked process of its own, from now until `deadline`
    (`time.perf_counter()` seconds), while this process goes on with its own search: `best` then
    takes the best of theirs and its own. On the real excerpt the hint a layer's candidates rank
    first is often not the one that searches best, and the local search uses one core: with two
    workers, the runner-up refined for the whole budget beside the 1 s ILP took its median distance
    to the offline bound from 16.9% to 15.5-15.8% and its p90 from 22.7% to 18-20%. A child stops
    `CHILD_RETURN_S` short of the deadline to send its plan back; one that fails or is later than
    as much past the deadline is dropped. Where processes cannot fork (or this one is a daemon, or
    runs other threads) nothing starts. Use as a context manager: leaving it stops the children."""

    def __init__(self, cluster: Cluster, counts: np.ndarray, current: LayerPlan | None, interval: int, starts,
                 deadline: float):
        import multiprocessing as mp
        import threading
        self.children, self.deadline = [], deadline
        # a process with other threads is not forked: a lock one of them holds would stay held in
        # the child (the runtime plans in a background thread)
        if (not starts or "fork" not in mp.get_all_start_methods() or mp.current_process().daemon
                or threading.active_count() > 1):
            return
        ctx = mp.get_context("fork")
        for x, share, owner in starts:
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_refine_child, daemon=True,
                            args=(send, cluster, counts, current, interval, x, share, owner,
                                  deadline - CHILD_RETURN_S - time.perf_counter()))
            p.start()
            send.close()
            self.children.append((p, recv))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p, recv in self.children:
            recv.close()
            if p.is_alive():
                p.terminate()
            p.join()
        self.children = []

    def best(self, x: np.ndarray, verdict: Verdict) -> tuple[np.ndarray, Verdict, int]:
        """(x, verdict, index): the children's best plan (index 1 for the first start, ...) if it
        beats this process's `x` and `verdict` (index 0), else those."""
        out = (x, verdict, 0)
        for i, (_, recv) in enumerate(self.children, start=1):
            if not recv.poll(max(self.deadline - time.perf_counter(), 0.0) + CHILD_RETURN_S):
                continue
            try:
                rx, v, _ = recv.recv()
            except (EOFError, OSError):  # the child died before sending
                continue
            if v.objective < out[1].objective - MIN_GAIN:
                out = (rx, v, i)
        return out


# seconds a forked start stops before the deadline, to send its plan back in time; one not back by
# then as much past the deadline is dropped
CHILD_RETURN_S = 0.02


def _refine_child(conn, cluster, counts, current, interval, x, share, owner, seconds) -> None:
    try:
        conn.send(refine(cluster, counts, current, interval, x, share, owner, seconds=max(seconds, 0.0)))
    finally:
        conn.close()


def realise(cluster: Cluster, counts: np.ndarray, replicas: np.ndarray, owner_node: np.ndarray,
            tokens: np.ndarray):
    """A device plan for a node-level one (`replicas[e, k]` and `tokens[e, k]` per node,
    `owner_node[e]`), laid out so that the weight sync over the slow links overlaps: a device's
    inter-node sync is the larger of the followers it hosts of experts owned on other nodes and
    the followers on other nodes of the experts it owns, so each owner of an expert served on
    several nodes gets a device of its own, and followers of other nodes' experts go first to
    those devices, up to their remote followers. The other replicas follow, heaviest first, each
    onto the least busy device with room. (x, share, owner), or None if a node's replicas do
    not fit its slots; shares are only a start (`refine` levels them)."""
    counts = np.asarray(counts, dtype=np.float64)
    load = counts.sum(axis=0)
    E, G = len(load), cluster.num_devices
    n = node_counts(cluster, replicas, owner_node)
    if n is None:
        return None
    tokens = np.asarray(tokens, dtype=np.float64)
    cross = (n > 0).sum(axis=1) > 1
    remote = n.sum(axis=1)[:, None] - n  # [E, K] replicas of e on other nodes than k
    node, a, b, slots = cluster.node_index, cluster.compute_a, cluster.compute_b, cluster.slots
    sync_s = inter_sync_s(cluster)
    x, tok, owner = np.zeros((E, G), dtype=bool), np.zeros((E, G)), np.full(E, -1)
    busy = np.zeros(G)  # compute seconds so far
    hosted, owed = np.zeros(G, dtype=np.int64), np.zeros(G, dtype=np.int64)  # followers hosted / owed across

    def put(e, g, k):
        x[e, g] = True
        tok[e, g] = tokens[e, k] / n[e, k]
        busy[g] += a[g] + b[g] * tok[e, g]

    for k, devs in enumerate(cluster.node_devices):
        room = lambda e: [int(g) for g in devs if x[:, g].sum() < slots[g] and not x[e, g]]
        for e in sorted(np.flatnonzero(cross & (owner_node == k)).tolist(), key=lambda e: (-remote[e, k], e)):
            g = min(room(e), key=lambda g: (owed[g] > 0, x[:, g].sum(), busy[g]))
            put(e, g, k)
            owner[e], owed[g] = g, owed[g] + remote[e, k]
        foreign = [e for e in np.argsort(-tokens[:, k] / np.maximum(n[:, k], 1), kind="stable").tolist()
                   if cross[e] and owner_node[e] != k]
        for e in foreign:
            for _ in range(n[e, k]):
                g = min(room(e), key=lambda g: (owed[g] <= hosted[g], hosted[g] - owed[g], busy[g]))
                put(e, g, k)
                hosted[g] += 1
        sync = sync_s * np.maximum(hosted, owed)
        rest = [(e, n[e, k] - int(x[e, devs].sum())) for e in range(E)]
        for e, left in sorted(rest, key=lambda r: -tokens[r[0], k] / max(n[r[0], k], 1)):
            for _ in range(max(left, 0)):
                g = min(room(e), key=lambda g: busy[g] + sync[g], default=None)
                if g is None:
                    return None
                put(e, g, k)
    for e in np.flatnonzero(owner < 0):
        mine = np.flatnonzero(x[e] & (node == owner_node[e]))
        owner[e] = int(mine[0]) if len(mine) else int(np.flatnonzero(x[e])[0])
    share = clean_shares(x, tok / np.maximum(load[:, None], 1e-300))
    return x, share, owner


def split_plans(cluster: Cluster, counts: np.ndarray, units=SPLIT_UNITS, rounds: int = 3,
                paired: bool = True) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """[(name, x, share, owner)]: `construct.demand_split`'s node plans (an expert served on each
    node that routes it at least `units` weight syncs' worth of tokens), laid out on devices two
    ways (`construct.from_nodes`; `realise`, owners paired with followers for the slow syncs to
    overlap), with shares levelled against each device's all-to-all and sync (`level_shares`). As
    constructed, their shares ignore the communication the split itself creates (levelling takes a
    fifth off their step on the real excerpt), so they lost to plans that search worse from. Hinted
    with the levelled ones, the ILP at 1 s per layer on the real excerpt (24 instances) comes within
    a median 17% of the offline bound, against 23% without. `rounds` of levelling, and `paired`:
    the `realise` layout too (the greedy, with milliseconds, takes one round of the first layout)."""
    counts = np.asarray(counts, dtype=np.float64)
    out, seen = [], set()
    for u in units:
        made = demand_split(cluster, counts, u)
        if made is None or (key := tuple(a.tobytes() for a in made)) in seen:
            continue
        seen.add(key)
        n, owner_node, tokens = made
        layouts = [("nodes", from_nodes(cluster, counts, tokens, owner_node))]
        if paired:
            layouts.append(("paired", realise(cluster, counts, n, owner_node, tokens)))
        for tag, plan in layouts:
            if plan is None:
                continue
            x, share, owner = plan
            share, _ = level_shares(cluster, counts, x, owner, clean_shares(x, share), rounds, within_nodes=True)
            out.append((f"split{u:g}/{tag}", x, share, owner))
    return out

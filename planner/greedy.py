"""The FlexMoE policy maker: expand, shrink and migrate replicas while the step gets faster.

The loop scores moves with a proxy, updated per move in O(devices^2) for the one expert moved:
exact for compute and replica synchronisation under even shares, and for the all-to-all it
routes each expert's tokens by the estimator's own hierarchical rule (own device, own node,
then other nodes), so that moves which keep traffic inside a node are seen to pay. A full
estimate costs about a millisecond at 256 experts on 64 devices, too dear for every move.
The estimator is the final judge: among the start, the greedy result, the greedy result with
levelled shares (up to `SHARES_CELLS`), the wrap-around construction and the node-aware
constructions (nodes first, then devices: `construct.hierarchical`, each also with owners that
spread the inter-node weight syncs: `construct.spread_owners`) and, on small multi-node layers,
node splits (each hot expert served on every node that routes it a weight sync's worth of
tokens: `refine.split_plans`), the best estimated objective wins (`judge`: best first on lower
bounds, so usually only the winner is estimated).
Deterministic: ties go to the lowest expert and device ids.
"""

from __future__ import annotations

import heapq
import threading

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import (A2A_PHASES, SYNC_PHASES, a2a_latency, cells, compute_makespan, estimate,
                                   fold_sources, node_replicas, sync_seconds)
from cost_models.routing import class_traffic
from planner.construct import balance_shares, hierarchical, mcnaughton, spread_owners
from planner.plan import LayerPlan, static_layer
from planner.refine import split_plans
from planner.score import clean_shares, device_floors, even_shares, floor_terms, migration_s, pick_owner, verdict

BALANCE_THRESHOLD = 1.02  # stop once the busiest device has at most 2% over the mean tokens
MIN_GAIN = 1e-9  # seconds: a move must beat this to count
PRUNE_MARGIN = 1e-9  # relative: a bound must beat the best by this to skip an estimate (rounding)
# experts x devices up to which the node-aware constructions are tried here: they cost about
# 20 ms per variant at 256 x 64, over the greedy's budget; the ILP, which has seconds, always tries them
HIERARCHICAL_CELLS = 4096
# experts x devices up to which the greedy placement is also judged with levelled shares: beyond,
# levelling compute costs locality (on the 156 guard instances it never won above 81 x 64, and
# lost by 9-17% at 256 x 64), and the levelling costs about 0.8 ms there
SHARES_CELLS = 8192
# experts x devices up to which plans that serve each node's own demand of the hot experts are
# judged too (`refine.split_plans`, one levelling round, one layout: about 14 ms at 32 x 16; on the
# real excerpt they take the greedy's median distance to the offline bound from 35% to 27%)
SPLIT_CELLS = 2048
TINY = np.finfo(np.float64).tiny
# per thread: a state's per-expert terms array, handed from plan to plan (`_terms_buffer`)
_spare = threading.local()


def _terms_buffer(shape) -> np.ndarray:
    """An array for a state's per-expert terms: the one the last plan in this thread gave back if
    it has this shape, else a new one. At 256 x 64 it is about 900 KB, mostly the largest block a
    plan frees, and glibc maps a block as large as the largest it has unmapped afresh every time
    (its dynamic mmap threshold): made anew each plan, its pages faulted in cost ~0.7 ms (220
    faults a plan, measured with getrusage)."""
    buf = getattr(_spare, "terms", None)
    if buf is not None and buf.shape == shape:
        _spare.terms = None  # taken: a second state in this thread gets its own
        return buf
    return np.empty(shape)


class _State:
    """Placement with even shares and the per-device proxy terms, updated move by move. The terms
    of each expert are one `[7, G]` block (sync, migration, the all-to-all's send intra, receive
    intra, send inter, receive inter over all its phases, then compute seconds), so a trial or a
    move adds and removes an expert's terms in one numpy call, and a device's time is read off the
    totals."""

    def __init__(self, cluster: Cluster, counts, x, owner, x0, owner0, interval):
        load = counts.sum(axis=0)
        self.c, self.load, self.interval = cluster, load, interval
        self.counts = np.ascontiguousarray(counts.T)  # [E, G]: tokens of each expert from each source
        self.x, self.owner = x.copy(), owner.copy()
        self.xT = np.ascontiguousarray(x.T)  # [G, E]: a device's experts in one contiguous row
        self.x0, self.owner0 = x0, owner0
        self.a, self.b = cluster.compute_a, cluster.compute_b
        self.P = cluster.expert.param_bytes
        self.invb = cluster.inv_beta
        self.node, self.num_nodes = cluster.node_index, cluster.num_nodes
        self.onehot = cluster.node_onehot  # [G, nodes]
        tb = cluster.expert.token_bytes
        self.lat = a2a_latency(cluster)
        self.inv_intra = _intra(cluster)
        # seconds per token over all the phases (times a power of two: the same numbers as
        # multiplying the sums by the phases afterwards)
        self.cost_intra = A2A_PHASES * tb * self.inv_intra
        self.cost_inter = A2A_PHASES * tb * (1.0 / cluster.links["inter"].beta if "inter" in cluster.links else 0.0)
        self.r = self.x.sum(axis=1)
        self.q = load / self.r  # tokens per replica
        e, g = cells(self.x)
        # each device's tokens: the sum over its experts in expert order, as `(x * q).sum(axis=0)`
        # adds them (bincount adds in the order given), without an [E, G] temporary
        self.tok = np.bincount(g, self.q[e], self.x.shape[1])
        self.n = self.x.sum(axis=0)
        self.last = self.p = None
        # positions of the experts, or of a trial's candidates (at most 2 slots' worth and 3 more):
        # sliced, not made, per trial
        self.ids = np.arange(len(load) + 2 * int(cluster.slots.max()) + 3)
        # constant per state: sync seconds of a follower on g with its owner o (`sync_to[o, g]`),
        # and what a new replica of e on g costs to copy (from its node if the expert is there)
        self.sync_to = SYNC_PHASES * self.P * self.invb.T
        near = np.take(node_replicas(cluster, x0) > 0, self.node, axis=1)  # the expert is on g's node
        copy_s = self.invb[owner0]  # in place from here: [E, G] temporaries cost page faults
        np.copyto(copy_s, self.inv_intra, where=near)
        copy_s *= self.P
        copy_s[x0] = 0.0  # on devices that held the expert before, nothing to copy
        self.copy_s = copy_s
        # moving the optimizer state, [from, to]: 0 on the diagonal (inv_beta's), so adding it for
        # every candidate's owner changes only the moved ones
        self.opt_s = cluster.expert.optimizer_bytes * self.invb
        self.terms_e = self._rows(slice(None), self.x, self.owner, self.x * self.q[:, None],
                                  _terms_buffer((len(load), 7, self.x.shape[1])))  # [E, 7, G]
        self.terms = self.terms_e.sum(axis=0)  # [7, G], all experts

    # the totals by kind: views into `terms`, so they follow its updates
    sync = property(lambda self: self.terms[0])
    mig = property(lambda self: self.terms[1])
    a2a_parts = property(lambda self: self.terms[2:6])

    def _rows(self, es, rows, owners, y=None, out=None):
        """Per-device proxy terms `[k, 7, G]` of experts `es` (indices, or a slice: views, no copies)
        placed as `rows[k, g]` with owners `owners[k]`: sync seconds, migration receive seconds,
        all-to-all (send intra, recv intra, send inter, recv inter) seconds under even shares,
        routed by the estimator's hierarchical rule (exact for the all-to-all when each link class
        has one bandwidth), and compute seconds. `y`: the rows' tokens per replica, if the caller
        has them; `out`, an array for the result."""
        n = len(rows)
        k = self.ids[:n]
        rows = np.asarray(rows, np.float64)  # once: numpy multiplies floats faster than bools by floats
        if y is None:
            y = rows * (self.load[es] / np.maximum(rows.sum(axis=1), 1))[:, None]
        out = np.empty((n, 7, rows.shape[1])) if out is None else out
        f, mig, a2a, comp = out[:, 0], out[:, 1], out[:, 2:6], out[:, 6]
        np.multiply(rows, self.a, out=comp)
        comp += y * self.b
        # sync: each follower and its owner pay a replica's bytes per phase over their link (the
        # owner's own cell is 0 here: `sync_to` has inv_beta's zero diagonal)
        np.multiply(self.sync_to[owners], rows, out=f)
        f[k, owners] = f.sum(axis=1)
        # migration: new replicas copy from the same node if the expert is there, else from the owner
        # (`copy_s` is finite and >= 0, so times the row is `where(rows, copy_s, 0)` to the bit)
        np.multiply(self.copy_s[es], rows, out=mig)
        mig[k, owners] += self.opt_s[self.owner0[es], owners]
        # all-to-all, routed as the estimator routes: own device, own node, then other nodes
        c = self.counts[es]
        local = np.minimum(c, y)
        sr = np.empty((n, 2, c.shape[1]))  # [k, send or receive, G]: tokens off the device
        np.subtract(c, local, out=sr[:, 0])
        np.subtract(y, local, out=sr[:, 1])
        by_node = (sr.reshape(2 * n, -1) @ self.onehot).reshape(n, 2, -1)
        # the part that stays in the node: a sender's by what its node takes, a receiver's by what it
        # sends (0 / TINY = 0 where neither moves anything; tokens are never subnormal)
        m_node = np.maximum(np.maximum(by_node[:, :1], by_node[:, 1:]), TINY)
        stay = by_node[:, ::-1] / m_node
        stay = np.take(stay, self.node, axis=2)  # not stay[..., node]: laid out column-major, slow to use
        # in place, in the order `sr * stay * cost`: few large temporaries (each costs page faults)
        intra, inter = a2a[:, :2], a2a[:, 2:]
        np.multiply(sr, stay, out=intra)
        intra *= self.cost_intra
        np.subtract(1, stay, out=stay)
        np.multiply(sr, stay, out=inter)
        inter *= self.cost_inter
        return out

    def _a2a(self, parts):
        """All-to-all seconds per device from its four parts: per link class the larger of send and
        receive (both classes in one call), plus latency."""
        port = np.maximum(parts[..., 0::2, :], parts[..., 1::2, :])  # (intra, inter)
        return port[..., 0, :] + port[..., 1, :] + self.lat

    def times(self):
        """Per-device proxy seconds; after `apply(..., k)`, the row its trial computed (the same
        terms, summed in another order: equal up to rounding)."""
        if self.p is None:
            self.p = self.terms[0] + self.terms[6] + self._a2a(self.terms[2:6])
        return self.p

    def score(self, p, mig):
        return p.max() + mig.max() / self.interval

    def trial(self, e, row, own):
        return float(self.trials(np.array([e]), row[None, :], np.array([own]))[0])

    def trials(self, es, rows, owners):
        """Objectives if each change (expert `es[k]` to replica row `rows[k]` with owner `owners[k]`)
        alone were made: one numpy pass. `apply(..., k)` reuses the rows computed here."""
        r = rows.sum(axis=1)
        y = rows * (self.load[es] / r)[:, None]  # tokens per replica after the change
        t = self._rows(es, rows, owners, y)
        total = self.terms[None] - self.terms_e[es] + t  # [k, 7, G]: each change's totals
        p = total[:, 0] + total[:, 6] + self._a2a(total[:, 2:6])
        self.last = (t, p, y, r)
        return p.max(axis=1) + total[:, 1].max(axis=1) / self.interval

    def apply(self, e, row, own, k=None):
        """Make the change; `k`: its index in the last `trials`, whose rows are then reused."""
        if k is not None:
            t, self.p, y, r_new = (v[k] for v in self.last)
        else:
            r_new = row.sum()
            y = row * (self.load[e] / r_new)
        self.tok += y - self.x[e] * (self.load[e] / self.r[e])
        self.n += row.astype(np.int64) - self.x[e]
        if k is None:
            t = self._rows(np.array([e]), row[None, :], np.array([own]))[0]
            self.p = None
        self.last = None
        self.terms += t - self.terms_e[e]
        self.terms_e[e] = t
        self.x[e], self.owner[e], self.r[e], self.q[e] = row, own, r_new, self.load[e] / r_new
        self.xT[:, e] = row


def _intra(cluster):
    return float(cluster.links["intra"].beta) ** -1


def _candidates(st: _State):
    """The paper's three moves, from the current state: (experts[k], new rows[k, G], new owners[k]),
    or None. Expansion is also tried for the straggler's own experts: the hottest expert may sit
    elsewhere. Built with few numpy calls (the loop's cost is their overhead): one gather of the
    experts' rows, then the changed cells set in two assignments."""
    p = st.times()
    q = st.q
    s = int(p.argmax())
    # expand the two experts with the highest load per replica (first of equals, as a stable sort)
    h1 = int(q.argmax())
    q1, q[h1] = q[h1], -np.inf
    hot = [h1, int(q.argmax())] if len(q) > 1 else [h1]
    q[h1] = q1
    on_s = np.flatnonzero(st.xT[s]).tolist()
    hot += [e for e in on_s if e not in hot]  # and the straggler's experts
    # onto the least busy device with room and no replica yet (first of equals)
    ok = (st.n < st.c.slots) & ~st.x[hot]
    gs = np.where(ok, p, np.inf).argmin(axis=1).tolist()
    has = ok.any(axis=1).tolist()
    owner = st.owner
    es = [e for e, h in zip(hot, has) if h]
    owners = [owner[e] for e in es]
    on, off = [[], []], [[], []]  # (candidate, device) cells set, cleared
    on[0] += range(len(es))
    on[1] += [g for g, h in zip(gs, has) if h]
    # shrink the expert with the lowest load per replica, on its busiest device
    e = int(np.where(st.r > 1, q, np.inf).argmin())
    if st.r[e] > 1:
        row = st.x[e]
        g = int(np.where(row, p, -np.inf).argmax())
        own = owner[e]
        if own == g:
            left = row.copy()
            left[g] = False
            own = int(np.where(left, p, np.inf).argmin())
        off[0].append(len(es))
        off[1].append(g)
        es.append(e)
        owners.append(own)
    # migrate a replica off the straggler to the least busy device with room (found above: on_s is in hot)
    for e in on_s:
        i = hot.index(e)
        if has[i]:
            on[0].append(len(es))
            on[1].append(gs[i])
            off[0].append(len(es))
            off[1].append(s)
            es.append(e)
            owners.append(gs[i] if owner[e] == s else owner[e])
    if not es:
        return None
    rows = st.x[es]
    rows[tuple(on)] = True
    rows[tuple(off)] = False
    return np.array(es), rows, np.array(owners)


def _expand_into_shrink(st: _State, best, width: int = 3):
    """When no slot is free: shrink a cold expert (lowest load per replica) on one of its devices and
    expand a hot one (highest load per replica, or one on the straggler) into the freed slot."""
    q = st.load / st.r
    multi = np.flatnonzero(st.r > 1)
    if not len(multi):
        return None
    p = st.times()
    straggler = int(np.argmax(p))
    hot = [int(e) for e in np.argsort(-q, kind="stable")[:width]]
    hot += [int(e) for e in np.flatnonzero(st.xT[straggler]) if e not in hot]
    cold = [int(e) for e in multi[np.argsort(q[multi], kind="stable")[:width]]]
    found = None
    for e_cold in cold:
        saved = (st.x[e_cold].copy(), st.owner[e_cold])
        for g in np.flatnonzero(st.x[e_cold]):
            row_c = saved[0].copy()
            row_c[g] = False
            own_c = saved[1] if saved[1] != g else int(np.flatnonzero(row_c)[0])
            st.apply(e_cold, row_c, own_c)
            for e_hot in hot:
                if e_hot == e_cold or st.x[e_hot, g]:
                    continue
                row_h = st.x[e_hot].copy()
                row_h[g] = True
                obj = st.trial(e_hot, row_h, st.owner[e_hot])
                if obj < best - MIN_GAIN:
                    best, found = obj, ([(e_cold, row_c, own_c), (e_hot, row_h, st.owner[e_hot])], obj)
            st.apply(e_cold, *saved)
    return found


def greedy(cluster: Cluster, counts: np.ndarray, current: LayerPlan | None = None, *, interval: int = 50,
           threshold: float = BALANCE_THRESHOLD, max_moves: int | None = None):
    """(x, share, owner, info): the policy maker's plan, judged by the estimator at the end."""
    return _plan(cluster, counts, current, interval, threshold, max_moves)[:4]


def greedy_judged(cluster: Cluster, counts: np.ndarray, current: LayerPlan | None = None, *, interval: int = 50,
                  threshold: float = BALANCE_THRESHOLD, max_moves: int | None = None):
    """`greedy`'s (x, share, owner, info) and the estimator's `score.Verdict` on that plan, with the
    verdict's own (cleaned) shares, so that `score.finish` need not clean them again."""
    x, _, owner, info, v = _plan(cluster, counts, current, interval, threshold, max_moves)
    return x, v.share, owner, info, v


def _plan(cluster: Cluster, counts: np.ndarray, current: LayerPlan | None, interval: int, threshold: float,
          max_moves: int | None):
    """(x, share as the winning candidate gave it, owner, info, the winner's `score.Verdict`)."""
    load = counts.sum(axis=0).astype(np.float64)
    num_experts = len(load)
    start = current if current is not None else static_layer(num_experts, cluster.slots)
    x0, owner0 = start.replicas(), start.owner.copy()
    ref_x, ref_owner = x0, current.owner if current is not None else owner0  # the start is the current plan
    st = _State(cluster, np.asarray(counts, dtype=np.float64), x0, owner0, ref_x, ref_owner, interval)
    max_moves = max_moves or num_experts + cluster.num_devices
    moves = 0
    best = st.score(st.times(), st.mig)
    while moves < max_moves:
        mean = st.tok.sum() / len(st.tok)  # as `mean()` computes it, without its overhead
        if mean > 0 and st.tok.max() / mean <= threshold:
            break
        step, obj = None, best
        cands = _candidates(st)
        if cands is not None:
            objs = st.trials(*cands)
            i = int(np.argmin(objs))  # the first of equals: deterministic
            if objs[i] < best - MIN_GAIN:
                es, rows, owners = cands
                step, obj = [(int(es[i]), rows[i], int(owners[i]), i)], float(objs[i])
        if step is None and (st.n >= cluster.slots).all():
            pair = _expand_into_shrink(st, best)
            if pair is not None:
                step, obj = pair
        if step is None:
            break
        for change in step:
            st.apply(*change)
        best, moves = obj, moves + 1
    # the estimator judges: start, greedy, greedy with levelled shares, wrap-around construction
    gx, go = st.x, st.owner
    _spare.terms = st.terms_e  # for the next plan in this thread (`_terms_buffer`)
    del st
    cands = [("start", x0, start.shares(), owner0), ("greedy", gx, even_shares(gx), go)]
    if num_experts * cluster.num_devices <= SHARES_CELLS:
        cands.append(("greedy+shares", gx, balance_shares(gx, load, cluster.compute_a, cluster.compute_b), go))
    mx, ms = mcnaughton(cluster, load)
    cands.append(("wrap-around", mx, ms, pick_owner(cluster, mx, ms, current)))
    if num_experts * cluster.num_devices <= HIERARCHICAL_CELLS:
        for name, hx, hs in hierarchical(cluster, counts):
            own = pick_owner(cluster, hx, hs, current)
            cands.append((name, hx, hs, own))
            # the same placement with owners that spread the syncs over the slow link
            base = estimate(cluster, counts, hx, hs).total  # seconds without sync
            cands.append((name + "/owners", hx, hs, spread_owners(cluster, hx, base, own)))
    if cluster.num_nodes > 1 and num_experts * cluster.num_devices <= SPLIT_CELLS:
        cands += split_plans(cluster, counts, rounds=1, paired=False)
    i, objs, best = judge(cluster, counts, cands, current, interval)
    name, x, share, owner = cands[i]
    return x, share, owner, {"solver": "greedy", "status": "heuristic", "moves_tried": moves, "picked": name,
                             "candidates": objs}, best


def judge(cluster: Cluster, counts, cands, current, interval):
    """(index of the best, {name: objective}, the best's `score.Verdict`) of candidates (name, x,
    share, owner) by the estimator's objective on the shares the plan would report
    (`score.clean_shares`), ties to the first. Best first on lower bounds, each a candidate's next
    one computed only when it comes first: its compute time alone; then `score.device_floors`,
    compute and all-to-all (near exact, a fraction of an estimate); then those plus its sync and
    migration (their cost again, so a candidate whose traffic already rules it out is spared
    them); then the estimate itself (on the floor's class traffic), so usually the winner alone is
    estimated. One whose bound exceeds the best objective found cannot win: not estimated, its
    objective reads None."""
    heap = [(compute_makespan(cluster, counts, x, s), 0, i) for i, (_, x, s, _) in enumerate(cands)]
    heapq.heapify(heap)
    best, objs, found = (np.inf, len(cands)), {}, None
    same = {}  # by (x, owner): candidates that differ only in shares share migration and sync
    shares, floors, traffic = {}, {}, {}  # by candidate: cleaned shares, floors without sync, class traffic
    terms = floor_terms(cluster)
    folded = fold_sources(counts, cluster.num_devices)
    while heap:
        bound, level, i = heapq.heappop(heap)
        if bound > best[0] * (1 + PRUNE_MARGIN):
            break  # every other bound is at least this
        name, x, s, o = cands[i]
        if level == 0:
            shares[i] = clean_shares(x, s)
            traffic[i] = class_traffic(folded, shares[i], cluster.node_index)
            floors[i] = device_floors(cluster, counts, x, shares[i], terms, traffic[i])
            heapq.heappush(heap, (float(floors[i].max()), 1, i))  # sync and migration are >= 0
            continue
        o = np.asarray(o)
        key = (x.tobytes(), o.tobytes())
        if key not in same:
            same[key] = migration_s(cluster, current, x, o, interval), sync_seconds(cluster, x, o)
        mig, sync = same[key]
        if level == 1:
            heapq.heappush(heap, (float((floors[i] + sync).max()) + mig, 2, i))
            continue
        v = verdict(cluster, counts, x, shares[i], o, current, interval, mig, sync, traffic[i][1])
        objs[name] = v.objective
        if (v.objective, i) < best:
            best, found = (v.objective, i), v
    return best[1], {name: objs.get(name) for name, *_ in cands}, found

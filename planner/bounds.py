"""Valid lower bounds on the planners' real objective: one home for every bound a plan reports.

The objective (`planner.score.objective`) is the estimated step, the slowest device's compute +
all-to-all + replica sync + latency, plus the amortised migration. Every bound here is valid for
*any* placement, shares and owners: no plan the estimator scores can beat it.

- `compute_bound`: perfect compute balance plus each device's all-to-all latency (a constant:
  the estimator charges one latency per peer per phase whatever the placement).
- `traffic_bound`: per device, the compute it must do combined with what it must send and
  receive: a source keeps local at most what its slots can hold of its own tokens (its `slots`
  largest counts), so the rest crosses a link; a device that serves more tokens than it keeps
  receives the difference. Cheap (numpy), used in every plan's report.
- `Relaxation`: a mixed-integer relaxation of the estimator (binary replicas `x` and owners `o`,
  continuous tokens `y`, local tokens `l`, per-device intra/inter send and receive with per-node
  and per-expert conservation of what crosses nodes, exact replica sync with owners, exact
  migration of the rules in `estimator.migration_transfers`). Routing is free in the relaxation
  (any flow, where the estimator uses a fixed rule), and link costs are each device's cheapest of
  its class, so its optimum is at most the estimator's. Its LP relaxation is a floor
  (`lp_bound`); solved as a MIP with a time limit (`solve`) its proven bound is the tight one and
  its plan is a candidate. Cuts: a replica serves at most what a device computes within an upper
  bound on the optimum (the best plan known), so hot experts need several replicas even in the LP.
`best_bound` is the max of the valid bounds computed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import A2A_PHASES, SYNC_PHASES, a2a_latency, fold_sources, lower_bound

SAFETY = 1e-6  # relative: a solver's bound is shaved by this, for its tolerances


def compute_bound(cluster: Cluster, counts: np.ndarray) -> float:
    """Perfect balance of compute plus the all-to-all latency each device pays anyway:
    sum_g (T - lat_g) / b_g >= tokens + experts * min(a/b)."""
    counts = np.asarray(counts, dtype=np.float64)
    a, b = cluster.compute_a, cluster.compute_b
    lat = a2a_latency(cluster)
    base = lower_bound(cluster, counts)
    # T >= lat_g on every device too; the balance with latency is the larger when all pay it
    with_lat = (counts.sum() + counts.shape[1] * (a / b).min() + (lat / b).sum()) / (1.0 / b).sum()
    return float(max(base, with_lat, lat.max()))


def _balance(weight, base, b, k, C, K, N):
    """Smallest T with shares t_i >= 0, sum t_i = N and, for every group i,
    weight_i * T >= base_i + b_i t_i + k_i max(C_i - L_i, t_i - L_i), L_i = min(t_i, K_i) (the most a
    group can keep local). The right side f_i is convex piecewise linear in t_i (breakpoints K_i,
    C_i), so each group's feasible t form an interval [lo_i(T), hi_i(T)]. Below t1, the largest of
    the groups' least values, some group has no feasible share. f_i's flat pieces lie at its least
    value, so from t1 on the ends move only along sloped pieces, each at a constant rate: sum hi
    rises and sum lo falls piecewise linearly, and one sweep over the pieces' ends (in order of T)
    finds exactly where each crosses N (shaved by `SAFETY * 1e-3` relative, for rounding)."""
    n = len(weight)
    # [4, n]: the t-breakpoints and the right side's values there, groups last
    pts = np.empty((4, n))
    pts[0], pts[1], pts[3] = 0.0, K, N
    np.maximum(C, K, out=pts[2])
    pts = np.maximum.accumulate(np.minimum(pts, N, out=pts), axis=0)
    L = np.minimum(pts, K)
    vals = (base + b * pts + k * np.maximum(C - L, pts - L)) / weight
    p0, p1, v0, v1 = pts[:3], pts[1:], vals[:3], vals[1:]  # [3, n] linear pieces
    dp, dv = p1 - p0, v1 - v0
    t1 = float(vals.min(axis=0).max())
    # the ends at t1: on each piece, its ends if under t1, else where it crosses t1 (a flat piece
    # divides by 1: its ends are both in or both out); clip as minimum(maximum()), without np.clip's
    # overhead
    ok = vals <= t1
    ok0, ok1 = ok[:3], ok[1:]
    cross = p0 + np.minimum(np.maximum((t1 - v0) / np.where(dv != 0, dv, 1.0), 0.0), 1.0) * dp
    ends = (np.where(ok1, p1, np.where(ok0, cross, -np.inf)).max(axis=0).sum(),  # sum hi
            np.where(ok0, p0, np.where(ok1, cross, np.inf)).min(axis=0).sum())  # sum lo
    best = t1
    for total, sign in zip(ends, (1.0, -1.0)):
        need = sign * (N - total)  # how far the sum must still move
        if need <= 0:
            continue
        # hi moves along rising pieces (from v0 to v1), lo along falling ones (from v1 to v0), at
        # dp / |dv| tokens per second, from t1 on
        start, stop = (v0, v1) if sign > 0 else (v1, v0)
        m = (stop > t1) & (stop > start)
        rate = dp[m] / (sign * dv[m])
        times = np.concatenate([np.maximum(start[m], t1), stop[m]])
        # events at one level may come in any order: the crossing lies past the last of them
        order = np.argsort(times)
        times = times[order]
        speed = np.cumsum(np.concatenate([rate, -rate])[order])  # after each event
        moved = np.empty(len(times))  # at each event
        moved[0] = 0.0
        np.cumsum(speed[:-1] * np.diff(times), out=moved[1:])
        j = int(np.searchsorted(moved, need))  # >= 1: moved[0] = 0 < need
        best = max(best, float(times[-1]) if j == len(moved)
                   else float(times[j - 1]) + (need - float(moved[j - 1])) / float(speed[j - 1]))
    return best * (1 - 1e-3 * SAFETY)


def _largest(a: np.ndarray, k: int) -> np.ndarray:
    """Each row's `k` largest values, largest first: a full descending sort's first `k` columns
    (the same numbers in the same order), from a partition, which costs a fraction of the sort."""
    n = a.shape[1]
    if k < n:
        a = np.partition(a, n - k, axis=1)[:, n - k:]
    return np.sort(a, axis=1)[:, ::-1]


def _cheapest(cluster: Cluster) -> np.ndarray:
    """Each device's cheapest seconds per byte to or from any other device (0 for a lone device:
    it sends nothing)."""
    c = np.minimum(*cluster.cheapest_inv_beta)
    return np.where(np.isfinite(c), c, 0.0)


def _keepable(cluster: Cluster, counts: np.ndarray) -> np.ndarray:
    """Tokens each device can keep of its own sources' (folded `counts[G, E]`): its `slots`
    largest counts (all of them when it has slots for every expert)."""
    smax = min(int(cluster.slots.max()), counts.shape[1])
    srt = _largest(counts, smax)
    return (srt * (np.arange(smax)[None, :] < cluster.slots[:, None])).sum(axis=1)


def traffic_bound(cluster: Cluster, counts: np.ndarray) -> float:
    """Compute and what must cross links, balanced over devices and over nodes (the larger).

    Per device g serving t tokens: it keeps local at most `L = min(t, K_g)` of its own tokens (K_g:
    its `slots` largest counts), so it sends at least `C_g - L` and receives at least `t - L`, each
    byte at its cheapest link, in each of the four all-to-all phases. Per node: the same with the
    node's demand, its slots in total (it can host at most that many experts), the inter-node
    links, and the node's devices' time added up (a node's sends over the slow links are at least
    its outflow, however its devices share them)."""
    counts = fold_sources(counts, cluster.num_devices)
    G = cluster.num_devices
    b, lat = cluster.compute_b, a2a_latency(cluster)
    co = cluster.cheapest_inv_beta[1]
    unit = A2A_PHASES * cluster.expert.token_bytes
    c = _cheapest(cluster)
    C = counts.sum(axis=1)
    K = _keepable(cluster, counts)
    N = float(counts.sum())
    best = _balance(np.ones(G), lat, b, unit * c, C, K, N)
    nodes = cluster.num_nodes
    # np.allclose(b, b[0])'s own test (b is finite), without its overhead
    if nodes > 1 and np.isfinite(co).all() and (np.abs(b - b[0]) <= 1e-8 + 1e-5 * abs(b[0])).all():
        onehot = cluster.node_onehot  # [G, K]
        D = onehot.T @ counts  # [K, E] node demand
        slots = onehot.T @ cluster.slots
        Ds = _largest(D, int(slots.max()))
        KN = (Ds * (np.arange(Ds.shape[1])[None, :] < slots[:, None])).sum(axis=1)
        # a node's devices' total time: sum_g (T - lat_g) >= b Y + 4 tb co max(out, in); co is each
        # node's cheapest inter-node link
        con = np.full(nodes, np.inf)
        np.minimum.at(con, cluster.node_index, co)
        best = max(best, _balance(onehot.sum(axis=0), onehot.T @ lat, np.full(nodes, b[0]), unit * con,
                                  D.sum(axis=1), KN, N))
    return float(best)


def quick_bound(cluster: Cluster, counts: np.ndarray) -> float:
    """The max of the cheap valid bounds: what every plan reports."""
    return max(compute_bound(cluster, counts), traffic_bound(cluster, counts))


def _status_name(status) -> str:
    from ortools.linear_solver import pywraplp
    S = pywraplp.Solver
    return {S.OPTIMAL: "optimal", S.FEASIBLE: "feasible", S.INFEASIBLE: "infeasible",
            S.NOT_SOLVED: "unknown"}.get(status, "error")


class _Scale(NamedTuple):
    """Units of a relaxation: tokens in blocks of `U` (the layer's tokens / 1000), time in `tau`
    seconds (the compute bound / 1000), so coefficients stay near 1."""

    U: float
    tau: float


def _scale(cluster: Cluster, counts: np.ndarray) -> _Scale:
    return _Scale(max(float(counts.sum()), 1.0) / 1000.0, max(compute_bound(cluster, counts), 1e-12) / 1000.0)


def _seconds(bound: float, tau: float, upper: float | None, infeasible: bool) -> float:
    """A solver's proven bound (in `tau` units) as seconds, shaved for its tolerances and at most
    `upper`. Infeasible under the caps `upper` set means no plan beats the known one: `upper`
    itself (already in seconds) is the bound."""
    if infeasible:
        return float(upper) * (1 - SAFETY) if upper is not None else 0.0
    bound = max(0.0, bound * tau * (1 - SAFETY)) if np.isfinite(bound) else 0.0
    return bound if upper is None else min(bound, upper)


def _replica_caps(cluster: Cluster, upper: float | None, U: float) -> np.ndarray:
    """Blocks one replica on each device can serve within `upper` seconds (inf without it)."""
    if upper is None:
        return np.full(cluster.num_devices, np.inf)
    return np.maximum((upper - a2a_latency(cluster) - cluster.compute_a) / cluster.compute_b, 0.0) / U


def finite_class_costs(cluster: Cluster) -> tuple[np.ndarray, np.ndarray]:
    """Each device's cheapest seconds per byte inside its node and across nodes
    (`Cluster.cheapest_inv_beta`), 0 where it has no link of the class (it sends nothing over it)."""
    ci, co = cluster.cheapest_inv_beta
    return np.where(np.isfinite(ci), ci, 0.0), np.where(np.isfinite(co), co, 0.0)


class _Ports(NamedTuple):
    """Per device: blocks sent and received inside the node (`si`, `ri`) and across (`so`, `ro`)."""

    si: list
    so: list
    ri: list
    ro: list


class _SyncLoad(NamedTuple):
    """Per device: follower replicas syncing inside the node and across (`fi`, `fo`), and the
    followers of the experts it owns inside and across (`oi`, `oo`)."""

    fi: list
    fo: list
    oi: list
    oo: list


class Relaxation:
    """The estimator as a mixed-integer program with free routing (see the module notes).

    Units: `_Scale`. `upper`: seconds of a known plan (the best so far), which caps what one
    replica can serve; bounds are then min(relaxation, upper), still valid."""

    def __init__(self, cluster: Cluster, counts, current=None, interval: int = 50, upper: float | None = None,
                 backend: str = "SCIP", integer: bool = True):
        from ortools.linear_solver import pywraplp
        counts = fold_sources(counts, cluster.num_devices)
        self.cluster, self.counts, self.interval, self.upper = cluster, counts, interval, upper
        self.G, self.E = cluster.num_devices, counts.shape[1]
        self.U, self.tau = _scale(cluster, counts)
        self.node, self.K = cluster.node_index, cluster.num_nodes
        s = pywraplp.Solver.CreateSolver(backend if integer else "GLOP")
        if s is None:
            raise RuntimeError(f"OR-Tools has no {backend} solver here")
        self.solver = s
        self.c = counts.T / self.U  # [E, G] blocks from each source
        self.cap = _replica_caps(cluster, upper, self.U)
        self._placement(integer)
        ports = self._ports()
        T = s.NumVar(0, s.infinity(), "T")
        self._device_times(T, ports, self._sync_load())
        obj = T
        if current is not None:
            obj = T + self._migration(current, self.node, interval) * (1.0 / interval)
        # the cheap bounds as a floor: valid for every plan, and the LP alone is weaker
        s.Add(T >= float(quick_bound(cluster, counts) / self.tau) * (1 - SAFETY))
        s.Minimize(obj)
        self.T = T

    def _placement(self, integer: bool) -> None:
        """Replicas `x`, owners `o`, blocks served `y` and kept local `l`, with their links."""
        s, G, E, c = self.solver, self.G, self.E, self.c
        L, cap = c.sum(axis=1), self.cap
        var = s.BoolVar if integer else (lambda name: s.NumVar(0, 1, name))
        x = [[var("") for _ in range(G)] for _ in range(E)]
        o = [[var("") for _ in range(G)] for _ in range(E)]
        y = [[s.NumVar(0, float(min(L[e], cap[g])), "") for g in range(G)] for e in range(E)]
        l = [[s.NumVar(0, float(min(c[e, g], L[e], cap[g])), "") for g in range(G)] for e in range(E)]
        for e in range(E):
            s.Add(sum(y[e]) == float(L[e]))
            s.Add(sum(o[e]) == 1)
            # replicas an expert needs if each serves at most `cap`
            if np.isfinite(cap).all() and cap.max() > 0:
                s.Add(sum(x[e]) >= float(np.ceil(L[e] / cap.max() - 1e-9)))
            for g in range(G):
                s.Add(y[e][g] <= float(min(L[e], cap[g])) * x[e][g])
                s.Add(l[e][g] <= y[e][g])
                s.Add(l[e][g] <= float(c[e, g]) * x[e][g])
                s.Add(o[e][g] <= x[e][g])
        for g in range(G):
            s.Add(sum(x[e][g] for e in range(E)) <= int(self.cluster.slots[g]))
        self.x, self.o, self.y, self.l = x, o, y, l

    def _ports(self) -> _Ports:
        """All-to-all: per device send = its demand - local, receive = served - local, each split
        intra/inter; across nodes, per-node and per-expert conservation."""
        s, G, E, c, l, y = self.solver, self.G, self.E, self.c, self.l, self.y
        inf = s.infinity()
        p = _Ports(*([s.NumVar(0, inf, "") for _ in range(G)] for _ in range(4)))
        for g in range(G):
            s.Add(p.si[g] + p.so[g] == float(c[:, g].sum()) - sum(l[e][g] for e in range(E)))
            s.Add(p.ri[g] + p.ro[g] == sum(y[e][g] - l[e][g] for e in range(E)))
        if self.K > 1:
            for k in range(self.K):
                self._node_crossing(p, [int(g) for g in np.flatnonzero(self.node == k)])
        return p

    def _node_crossing(self, p: _Ports, devs: list[int]) -> None:
        """Blocks of each expert leaving a node come from its sources' unserved tokens, those
        entering are served by its replicas; they differ by demand less service."""
        s, E, c, l, y = self.solver, self.E, self.c, self.l, self.y
        L, cap = c.sum(axis=1), self.cap
        out_t, in_t = [], []
        for e in range(E):
            s_o = [s.NumVar(0, float(c[e, g]), "") for g in devs]
            r_o = [s.NumVar(0, float(min(L[e], cap[g])), "") for g in devs]
            for j, g in enumerate(devs):
                s.Add(s_o[j] <= float(c[e, g]) - l[e][g])
                s.Add(r_o[j] <= y[e][g] - l[e][g])
            s.Add(sum(s_o) - sum(r_o) == float(c[e, devs].sum()) - sum(y[e][g] for g in devs))
            out_t.append(s_o)
            in_t.append(r_o)
        for j, g in enumerate(devs):
            s.Add(p.so[g] == sum(out_t[e][j] for e in range(E)))
            s.Add(p.ro[g] == sum(in_t[e][j] for e in range(E)))
        s.Add(sum(p.si[g] for g in devs) == sum(p.ri[g] for g in devs))  # intra stays in the node

    def _sync_load(self) -> _SyncLoad:
        """Replica sync with free owners: followers on g by the owner's link class, and followers
        of the experts g owns."""
        s, G, E, K, node, x, o = self.solver, self.G, self.E, self.K, self.node, self.x, self.o
        inf = s.infinity()
        own_node = [[sum(o[e][int(h)] for h in np.flatnonzero(node == k)) for k in range(K)] for e in range(E)]
        out = _SyncLoad([], [], [], [])
        for g in range(G):
            k = int(node[g])
            fo_terms, fi_terms, oi_terms, oo_terms = [], [], [], []
            same = np.flatnonzero((node == k) & (np.arange(G) != g))
            other = np.flatnonzero(node != k)
            for e in range(E):
                if K > 1:
                    fo = s.NumVar(0, 1, "")
                    s.Add(fo >= x[e][g] - own_node[e][k])
                    fo_terms.append(fo)
                    wo = s.NumVar(0, inf, "")
                    s.Add(wo >= sum(x[e][int(h)] for h in other) - len(other) * (1 - o[e][g]))
                    oo_terms.append(wo)
                    fi_terms.append(x[e][g] - o[e][g] - fo)
                else:
                    fi_terms.append(x[e][g] - o[e][g])
                if len(same):
                    wi = s.NumVar(0, inf, "")
                    s.Add(wi >= sum(x[e][int(h)] for h in same) - len(same) * (1 - o[e][g]))
                    oi_terms.append(wi)
            out.fi.append(sum(fi_terms)), out.fo.append(sum(fo_terms) if fo_terms else 0)
            out.oi.append(sum(oi_terms) if oi_terms else 0), out.oo.append(sum(oo_terms) if oo_terms else 0)
        return out

    def _device_times(self, T, p: _Ports, f: _SyncLoad) -> None:
        """T >= each device's compute + all-to-all + sync + latency; per phase and link class the
        larger of send and receive, at the device's cheapest link of the class."""
        s, G, E, U, tau, cl = self.solver, self.G, self.E, self.U, self.tau, self.cluster
        a, b, lat = cl.compute_a, cl.compute_b, a2a_latency(cl)
        ci, co = finite_class_costs(cl)
        tb, P = cl.expert.token_bytes, cl.expert.param_bytes
        P_i, P_o = SYNC_PHASES * P * ci / tau, SYNC_PHASES * P * co / tau
        ki, ko = A2A_PHASES * tb * U * ci / tau, A2A_PHASES * tb * U * co / tau
        for g in range(G):
            A = s.NumVar(0, s.infinity(), "")
            for p_i in (p.si[g], p.ri[g]):
                for p_o in (p.so[g], p.ro[g]):
                    s.Add(A >= float(ki[g]) * p_i + float(ko[g]) * p_o)
            Y = s.NumVar(0, s.infinity(), "")
            for f_i in (f.fi[g], f.oi[g]):
                for f_o in (f.fo[g], f.oo[g]):
                    s.Add(Y >= float(P_i[g]) * f_i + float(P_o[g]) * f_o)
            s.Add(T >= float(a[g] / tau) * sum(self.x[e][g] for e in range(E)) + float(b[g] * U / tau)
                  * sum(self.y[e][g] for e in range(E)) + A + Y + float(lat[g] / tau))

    def _migration(self, current, node, interval):
        """The migration time of `estimator.migration_transfers`, exactly linear in x and o: a new
        replica copies from the first old replica on its node, else from the old owner; a moved
        owner takes the optimizer state from the old owner."""
        s, cl, tau = self.solver, self.cluster, self.tau
        G, E = self.G, self.E
        x0, own0 = current.replicas(), current.owner
        P, OB = cl.expert.param_bytes, cl.expert.optimizer_bytes
        invb, alpha, inter = cl.inv_beta, cl.alpha, cl.inter_mask
        terms = {(d, cls, side): [] for d in range(G) for cls in (0, 1) for side in (0, 1)}
        lat = {d: [] for d in range(G)}

        def transfer(var, src, dst, nbytes):
            cls = int(inter[src, dst])
            t = nbytes * invb[src, dst] / tau
            terms[src, cls, 0].append(float(t) * var)
            terms[dst, cls, 1].append(float(t) * var)
            lat[src].append(float(alpha[src, dst] / tau) * var)
            lat[dst].append(float(alpha[src, dst] / tau) * var)

        for e in range(E):
            holders = np.flatnonzero(x0[e])
            for g in range(G):
                if x0[e, g]:
                    continue
                near = holders[node[holders] == node[g]]
                transfer(self.x[e][g], int(near[0]) if len(near) else int(own0[e]), g, P)
            for g in range(G):
                if g != own0[e]:
                    transfer(self.o[e][g], int(own0[e]), g, OB)
        M = s.NumVar(0, s.infinity(), "mig")
        for d in range(G):
            for p_i in (terms[d, 0, 0], terms[d, 0, 1]):
                for p_o in (terms[d, 1, 0], terms[d, 1, 1]):
                    s.Add(M >= sum(p_i) + sum(p_o) + sum(lat[d]))
        return M

    def solve(self, seconds: float, threads: int = 1):
        """(bound seconds, plan (x, share, owner) or None, status). The bound is the solver's
        proven one, shaved for tolerances, and at most `upper`."""
        s = self.solver
        s.SetTimeLimit(int(max(seconds, 0.01) * 1000))
        try:
            s.SetNumThreads(int(threads))
        except Exception:  # some backends take no thread count
            pass
        st = s.Solve()
        from ortools.linear_solver import pywraplp
        have = st in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE)
        if st == pywraplp.Solver.OPTIMAL and not self._integer():
            bound = s.Objective().Value()
        elif self._integer():
            bound = s.Objective().BestBound()  # proven also when the limit came before a solution
        else:
            bound = 0.0
        infeasible = st == pywraplp.Solver.INFEASIBLE
        bound = _seconds(bound, self.tau, self.upper, infeasible)
        plan = None
        if have and self._integer():
            xs = np.array([[v.solution_value() > 0.5 for v in row] for row in self.x])
            ys = np.array([[max(v.solution_value(), 0.0) for v in row] for row in self.y])
            own = np.array([int(np.argmax([v.solution_value() for v in row])) for row in self.o])
            plan = (xs, ys, own)
        return float(bound), plan, _status_name(st)

    def _integer(self):
        return any(v.integer() for v in self.x[0])


def lp_bound(cluster: Cluster, counts, current=None, interval: int = 50, upper: float | None = None) -> float:
    """The relaxation's LP bound (GLOP): a floor, valid for any plan."""
    r = Relaxation(cluster, counts, current, interval, upper, integer=False)
    return r.solve(60.0)[0]


class NodeRelaxation:
    """Nodes as single machines: a small MIP whose bound is valid for the device-level problem.

    Per expert and node: hosted `u`, replicas `n`, owner node `own`, tokens served `Y`, blocks
    leaving `out` and entering `inn` (their difference is node demand less service, exactly as
    routing has it). A node's devices' time summed (`m_k T`) must cover its latency, compute
    (`a n + b Y`, cheapest device), its all-to-all (intra sends at NVLink cost, the larger of
    outflow and inflow at the inter-node cost), its replica sync (every replica in a node that
    does not own the expert syncs over the slow link, the owner node pays the larger of its
    followers' and its own), and its share of migration. Binary decisions are per (expert, node)
    only, so the solver proves far more than on the device model; the device-level facts it
    loses come back as rows on the devices holding one expert's replicas on a node (each pays its
    own all-to-all and the replicas' sync besides the expert's tokens: `_expert_rows`) and through
    the cheap bounds as a floor."""

    def __init__(self, cluster: Cluster, counts, current=None, interval: int = 50, upper: float | None = None,
                 backend: str = "SCIP", local_cuts: bool = True):
        """`local_cuts`: per-expert limits on what stays on its source's device (tighter, but
        the solver may take longer to prove it: running both and keeping the max is valid)."""
        from ortools.linear_solver import pywraplp
        counts = fold_sources(counts, cluster.num_devices)
        self.cluster, self.counts, self.upper, self.local_cuts = cluster, counts, upper, local_cuts
        self.E = counts.shape[1]
        self.node, self.K = cluster.node_index, cluster.num_nodes
        self.U, self.tau = _scale(cluster, counts)
        self.solver = s = pywraplp.Solver.CreateSolver(backend)
        self._node_data()
        self._variables()
        T = s.NumVar(0, s.infinity(), "T")
        self.T_low = float(quick_bound(cluster, counts) / self.tau) * (1 - SAFETY)
        self._expert_rows(T)
        self.parts = []  # per node (replicas, blocks served, all-to-all, sync): for `terms`
        mig = None
        if current is not None:
            mig = s.NumVar(0, s.infinity(), "mig")
        for k in range(self.K):
            self._node_time(k, T)
            if mig is not None:
                self._node_migration(k, mig, current)
        if mig is not None and self.K > 1:
            self._migration_lumps(mig, current)
        s.Add(T >= self.T_low)
        s.Minimize(T + (mig * (1.0 / interval) if mig is not None else 0))
        self.T, self.mig, self.interval = T, mig, interval

    def _node_data(self) -> None:
        """Per node, in the relaxation's units: devices, demand, slots, link costs, caps."""
        cl, U, tau, K = self.cluster, self.U, self.tau, self.K
        a, b, lat = cl.compute_a, cl.compute_b, a2a_latency(cl)
        self.c = c = self.counts.T / U
        self.L = c.sum(axis=1)
        self.devs = devs = [np.flatnonzero(self.node == k) for k in range(K)]
        self.m = np.array([len(d) for d in devs])
        self.slots = np.array([int(cl.slots[d].sum()) for d in devs])
        self.per_dev = np.array([int(min(len(d), cl.slots[d].sum())) for d in devs])  # replicas of one expert
        self.D = np.stack([c[:, d].sum(axis=1) for d in devs], axis=1)  # [E, K]
        self.Ktop = np.array([sum(np.sort(c[:, g])[::-1][:int(cl.slots[g])].sum() for g in d) for d in devs])
        caps = _replica_caps(cl, self.upper, U)
        self.cap = np.array([caps[d].max() for d in devs])  # the node's most capable device
        ci, co = finite_class_costs(cl)
        self.ci_k = np.array([ci[d].min() for d in devs])
        self.co_k = np.array([co[d].min() for d in devs])
        # a replica's fixed time: its device's latency, the replica's own compute term and the
        # all-to-all the device pays whatever it serves (it sends what its slots cannot keep of
        # its own tokens, at its cheapest link: `traffic_bound`'s floor)
        sends = A2A_PHASES * cl.expert.token_bytes * _cheapest(cl) * (self.counts.sum(axis=1)
                                                                      - _keepable(cl, self.counts))
        self.floor_c = np.array([float((lat[d] + a[d] + sends[d]).min()) for d in devs]) / tau
        self.fixed_c = np.array([float((lat[d] + a[d]).min()) for d in devs]) / tau  # without the sends
        # [K][E, j]: what e's j largest sources on node k route (what j replicas there keep at most)
        self.top = [np.concatenate([np.zeros((self.E, 1)), np.cumsum(-np.sort(-c[:, d], axis=1), axis=1)], axis=1)
                    for d in devs]
        self.bu = np.array([float(b[d].min()) for d in devs]) * U / tau  # time units per block
        P = cl.expert.param_bytes
        self.pi, self.po = SYNC_PHASES * P * self.ci_k / tau, SYNC_PHASES * P * self.co_k / tau  # a sync unit
        tb = cl.expert.token_bytes
        self.ki, self.ko = A2A_PHASES * tb * U * self.ci_k / tau, A2A_PHASES * tb * U * self.co_k / tau  # a block

    def _variables(self) -> None:
        s, E, K = self.solver, self.E, self.K
        self.u = [[s.BoolVar("") for _ in range(K)] for _ in range(E)]
        # z[e][k][j-1]: expert e has exactly j replicas on node k; n = sum j z, u = sum z
        self.z = z = [[[s.BoolVar("") for _ in range(int(self.per_dev[k]))] for k in range(K)] for _ in range(E)]
        self.n = [[sum((j + 1) * v for j, v in enumerate(z[e][k])) for k in range(K)] for e in range(E)]
        self.own = [[s.BoolVar("") for _ in range(K)] for _ in range(E)]
        self.Y = [[s.NumVar(0, float(self.L[e]), "") for _ in range(K)] for e in range(E)]
        self.out = [[s.NumVar(0, float(self.D[e, k]), "") for k in range(K)] for e in range(E)]
        self.inn = [[s.NumVar(0, float(self.L[e]), "") for _ in range(K)] for e in range(E)]

    def _expert_rows(self, T) -> None:
        """Per expert: service adds up, one owner, and what its replicas can serve within T."""
        s, K, L, bu, floor_c, per_dev = self.solver, self.K, self.L, self.bu, self.floor_c, self.per_dev
        z, n, u, own, Y = self.z, self.n, self.u, self.own, self.Y
        for e in range(self.E):
            s.Add(sum(Y[e]) == float(L[e]))
            s.Add(sum(own[e]) == 1)
            # the device holding e's largest replica computes at least L_e / (replicas): convex
            # in the replica count, so the lines through consecutive integers bound it below
            R = sum(n[e][k] for k in range(K))
            f = lambda r: float(floor_c.min() + bu.min() * L[e] / r)
            for r in range(1, int(per_dev.sum()) + 1):
                s.Add(T >= f(r) + (f(r + 1) - f(r)) * (R - r))
            for k in range(K):
                s.Add(sum(z[e][k]) == u[e][k])
                # j replicas on node k serve at most j devices' time less what those devices pay
                # anyway: b Y <= j (T - fixed) - their sync (`_replica_sync`), where the fixed
                # part holds the all-to-all each device pays for its own sources; or, the other
                # side of the all-to-all, the tokens of e they receive: all they serve but what
                # the j largest sources there keep, those entering the node across
                ki, ko, top = float(self.ki[k]), float(self.ko[k]), self.top[k][e]
                most = float((bu[k] + ki + ko) * L[e] + 2 * self.po[k] + 2 * per_dev[k] * self.pi[k])
                # (none when e is too light for them to bind: T's floor implies them; a smaller model)
                sync = self._replica_sync(e, k) if most > self.T_low - floor_c[k] else None
                for j, v in enumerate(z[e][k] if sync is not None else [], start=1):
                    big = float((bu[k] + ki + ko) * L[e] + j * (floor_c[k] + self.po[k] + 2 * self.pi[k]) + self.po[k])
                    s.Add(float(bu[k]) * Y[e][k] <= j * T - j * float(floor_c[k]) - sync(j) + big * (1 - v))
                    s.Add((float(bu[k]) + ki) * Y[e][k] + (ko - ki) * self.inn[e][k]
                          <= j * T - j * float(self.fixed_c[k]) - sync(j) + ki * float(top[j]) + big * (1 - v))
                s.Add(own[e][k] <= u[e][k])
                s.Add(Y[e][k] <= float(min(L[e], self.cap[k] * per_dev[k])) * u[e][k])
                if np.isfinite(self.cap[k]):
                    s.Add(Y[e][k] <= float(self.cap[k]) * n[e][k])
                s.Add(self.out[e][k] - self.inn[e][k] == float(self.D[e, k]) - Y[e][k])

    def _replica_sync(self, e: int, k: int):
        """The sync the devices holding e's j replicas on node k pay at least, as a function of j:
        off e's owner node each replica is a follower across (one inter-node unit each); on it,
        the owner receives from the j - 1 others and each of them sends (intra units), and the
        owner also receives across when e is served on another node too."""
        s, K, u, own = self.solver, self.K, self.u, self.own
        if K == 1:
            return lambda j: 2 * (j - 1) * float(self.pi[k]) * own[e][k]
        cross = s.NumVar(0, 1, "")  # e owned on k and served elsewhere too
        for j in range(K):
            if j != k:
                s.Add(cross >= own[e][k] + u[e][j] - 1)
        pi, po = float(self.pi[k]), float(self.po[k])
        return lambda j: j * po * (1 - own[e][k]) + po * cross + 2 * (j - 1) * pi * own[e][k]

    def _kept_local(self, k: int):
        """Blocks kept on their own device in node k: at most what the devices' slots hold of
        their own sources' tokens, and at most what the node serves of its own demand; per
        expert, with j replicas on the node, at most the j largest of its sources' counts there."""
        s, E, Y, out, inn = self.solver, self.E, self.Y, self.out, self.inn
        loc = s.NumVar(0, float(self.Ktop[k]), "")
        s.Add(loc <= sum(Y[e][k] - inn[e][k] for e in range(E)))
        s.Add(loc <= float(self.D[:, k].sum()) - sum(out[e][k] for e in range(E)))
        top = -np.sort(-self.c[:, self.devs[k]], axis=1)  # [E, m_k]
        loc_e = []
        for e in range(E if self.local_cuts else 0):
            le = s.NumVar(0, float(self.D[e, k]), "")
            s.Add(le <= sum(float(top[e, :j].sum()) * v for j, v in enumerate(self.z[e][k], start=1)))
            s.Add(le <= Y[e][k] - inn[e][k])
            s.Add(le <= float(self.D[e, k]) - out[e][k])
            loc_e.append(le)
        if loc_e:
            s.Add(loc <= sum(loc_e))
        return loc

    def _node_a2a(self, k: int):
        """Node k's all-to-all time: intra sends at NVLink cost, the larger of outflow and inflow
        at the inter-node cost."""
        s, E = self.solver, self.E
        outk = sum(self.out[e][k] for e in range(E))
        ink = sum(self.inn[e][k] for e in range(E))
        intra = float(self.D[:, k].sum()) - self._kept_local(k) - outk  # sent inside the node (= received inside)
        ki, ko = self.ki[k], self.ko[k]
        A = s.NumVar(0, s.infinity(), "")
        s.Add(A >= float(ki) * intra + float(ko) * outk)
        s.Add(A >= float(ki) * intra + float(ko) * ink)
        return A

    def _node_sync(self, k: int):
        """Node k's sync time: followers in k of experts owned elsewhere (inter), intra followers,
        and the followers elsewhere of the experts k owns. Per device and link class the larger of
        what it sends as a follower and receives as an owner: an owner with F_o followers across
        and F_i inside hosts at most slots - 1 followed replicas itself, so, with them on the slow
        class first, at least po (F_o - spare) + pi F_i (or pi (F_o + F_i - spare) when F_o is
        below spare) of its receipts overlap no send of its own."""
        s, E, K, n, own, inf = self.solver, self.E, self.K, self.n, self.own, self.solver.infinity()
        M = int(sum(self.per_dev)) + 1
        fo, fi, oo, lump = [], [], [], []
        spare = int(self.cluster.slots[self.devs[k]].max()) - 1  # followers an owner's device can host
        pi, po = float(self.pi[k]), float(self.po[k])
        for e in range(E):
            v = s.NumVar(0, inf, "")
            s.Add(v >= n[e][k] - M * own[e][k])
            fo.append(v)
            w = s.NumVar(0, inf, "")
            s.Add(w >= n[e][k] - 1 - M * (1 - own[e][k]))
            fi.append(w)
            w2 = s.NumVar(0, inf, "")
            s.Add(w2 >= sum(n[e][j] for j in range(K) if j != k) - M * (1 - own[e][k]))
            oo.append(w2)
            # what e's owner receives beyond the sends it can overlap it with: it hosts at most
            # `spare` followed replicas, best used on the slow class first
            x2 = s.NumVar(0, inf, "")
            s.Add(x2 >= pi * (w + w2 - spare))
            if K > 1:
                s.Add(x2 >= po * (w2 - spare) + pi * w)
            lump.append(x2)
        S = s.NumVar(0, inf, "")
        s.Add(S >= pi * sum(fi) + po * sum(oo))
        # per device max(sent as a follower, received as an owner) summed: the followers hosted,
        # plus what owners receive beyond that (a device owning several experts has fewer slots
        # to spare, so the experts' lumps add up to at most its own)
        s.Add(S >= pi * sum(fi) + po * sum(fo) + sum(lump))
        return S

    def _node_time(self, k: int, T) -> None:
        """Node k's devices' time summed covers its latency, compute, all-to-all and sync."""
        s, E, cl, d, tau = self.solver, self.E, self.cluster, self.devs[k], self.tau
        lat = a2a_latency(cl)
        s.Add(sum(self.n[e][k] for e in range(E)) <= int(self.slots[k]))
        nk = sum(self.n[e][k] for e in range(E))
        Yk = sum(self.Y[e][k] for e in range(E))
        A, S = self._node_a2a(k), self._node_sync(k)
        self.parts.append((nk, Yk, A, S))
        s.Add(float(self.m[k]) * T >= float(lat[d].sum() / tau) + float(cl.compute_a[d].min() / tau) * nk
              + float(cl.compute_b[d].min() * self.U / tau) * Yk + A + S)

    def _node_migration(self, k: int, mig, current) -> None:
        """Each device's migration receive time is at most mig: new replicas in the node (from the
        node if it held the expert, else from across) and owners moved in."""
        s, d, cl, tau = self.solver, self.devs[k], self.cluster, self.tau
        P, OB = cl.expert.param_bytes, cl.expert.optimizer_bytes
        x0, own0 = current.replicas(), current.owner
        terms = []
        for e in range(self.E):
            had = int(x0[e, d].sum())
            new = s.NumVar(0, s.infinity(), "")
            s.Add(new >= self.n[e][k] - had)
            cost = self.ci_k[k] if had else self.co_k[k]
            terms.append(float(P * cost / tau) * new)
            if self.node[own0[e]] != k:
                terms.append(float(OB * self.co_k[k] / tau) * self.own[e][k])
        s.Add(float(self.m[k]) * mig >= sum(terms))

    def _migration_lumps(self, mig, current) -> None:
        """Migration is the busiest device's, and some transfers cannot be spread over a node: an
        old owner sends, alone over its inter-node link, the weights of every new replica on a
        node that held none of its experts' replicas and the optimizer state of every owner moved
        off its node; a new owner from another node receives the optimizer state alone (and the
        weights, when its node held no replica)."""
        s, cl, tau, E, K = self.solver, self.cluster, self.tau, self.E, self.K
        P, OB = cl.expert.param_bytes, cl.expert.optimizer_bytes
        x0, own0 = current.replicas(), current.owner
        _, co = finite_class_costs(cl)
        had = np.stack([x0[:, d].any(axis=1) for d in self.devs], axis=1)  # [E, K]
        for d0 in np.unique(own0):
            k0, terms = int(self.node[d0]), []
            for e in np.flatnonzero(own0 == d0):
                for k in range(K):
                    if k == k0:
                        continue
                    if not had[e, k]:
                        terms.append(float(P * co[d0] / tau) * self.n[e][k])
                    terms.append(float(OB * co[d0] / tau) * self.own[e][k])
            if terms:
                s.Add(mig >= sum(terms))
        for e in range(E):
            for k in range(K):
                if k != int(self.node[own0[e]]):
                    s.Add(mig >= float((OB + (0 if had[e, k] else P)) * self.co_k[k] / tau) * self.own[e][k])

    def solve(self, seconds: float, threads: int = 1):
        """(bound seconds, node solution (u, n, own, Y tokens) or None, status)."""
        from ortools.linear_solver import pywraplp
        s = self.solver
        s.SetTimeLimit(int(max(seconds, 0.01) * 1000))
        st = s.Solve()
        bound = _seconds(s.Objective().BestBound(), self.tau, self.upper, st == pywraplp.Solver.INFEASIBLE)
        sol = None
        if st in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            val = lambda vs: np.array([[v.solution_value() for v in row] for row in vs])
            nv = np.array([[sum((j + 1) * v.solution_value() for j, v in enumerate(zk)) for zk in ze] for ze in self.z])
            sol = (val(self.u) > 0.5, np.rint(nv).astype(int), val(self.own).argmax(axis=1),
                   np.maximum(val(self.Y), 0.0) * self.U)
        return float(bound), sol, _status_name(st)

    def fix_to(self, x, share, owner) -> None:
        """Fix the node decisions (replicas per node, owner node, tokens served per node) to a
        device plan's: a `solve` then bounds that plan's objective and `terms` say what the node
        model charges for its structure (the rest of the plan's cost is what the model misses)."""
        x, share, L = np.asarray(x, bool), np.asarray(share, float), self.counts.sum(axis=0)
        for e in range(self.E):
            for k, d in enumerate(self.devs):
                n = int(x[e, d].sum())
                for j, v in enumerate(self.z[e][k], start=1):
                    v.SetBounds(float(j == n), float(j == n))
                self.u[e][k].SetBounds(float(n > 0), float(n > 0))
                mine = float(self.node[int(owner[e])] == k)
                self.own[e][k].SetBounds(mine, mine)
                y = float(L[e] * share[e, d].sum() / self.U)
                self.Y[e][k].SetBounds(y * (1 - 1e-7), y * (1 + 1e-7))

    def terms(self) -> dict:
        """After a `solve` with a solution: the incumbent's time split as the node model charges
        it, seconds per device averaged over the cluster (`compute`, `a2a` without latency,
        `sync`, `latency`; `step`: its T; `migration`: amortised, as in the objective). Beside a
        plan's `experiments.offline.term_means` it says which term the relaxation sees cheaper
        than the plan pays."""
        cl, tau, G = self.cluster, self.tau, self.cluster.num_devices
        a, b = cl.compute_a, cl.compute_b
        val = lambda v: float(v.solution_value()) if hasattr(v, "solution_value") else float(v)
        comp = sum(float(a[d].min()) * val(n) + float(b[d].min()) * val(Y) * self.U
                   for d, (n, Y, _, _) in zip(self.devs, self.parts))
        return {"compute": comp / G, "a2a": sum(val(A) for _, _, A, _ in self.parts) * tau / G,
                "sync": sum(val(S) for _, _, _, S in self.parts) * tau / G,
                "latency": float(a2a_latency(cl).mean()), "step": val(self.T) * tau,
                "migration": (val(self.mig) * tau / self.interval) if self.mig is not None else 0.0}

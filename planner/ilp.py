"""The exact planner: a CP-SAT model of one layer's step, warm-started from the best heuristic plan.

Variables: `x[e,g]` replica present, `y[e,g]` token blocks served (a block is 1/BLOCKS of the
layer's tokens, so coefficients stay small), `l[e,g]` blocks kept local (local-first routing).
Owners are the hint's (the current owner where it keeps a replica): with owners fixed, replica
sync is exactly linear, and owner variables (with their big-M links) made the model several
times larger and its bound weaker for little gain. Device time = compute + all-to-all + sync +
latency, all linear:
- compute `a_g * replicas + b_g * tokens`;
- all-to-all: per link class, 4 x max(send, receive). On several nodes the model follows the
  estimator's hierarchical routing: an expert's blocks leaving node k are `max(0, D[e,k] -
  Y[e,k])` (node demand less node service), shared by the node's sources in proportion to what
  each does not keep local (the hint's parts), and those entering are received by the node's
  replicas in proportion to what each takes beyond its own source's tokens (at the hint's ratio
  of inflow to that total: a replica added or dropped changes the spread, as it would in the
  rule); the rest of the remote traffic is charged at intra-node cost. So a plan that serves
  each node's demand on that node is seen to save the slow links. On one node (or a per-node
  subproblem) a device receives `y - l` remote blocks and sends `c - l`, at intra-node cost;
- sync: each follower replica and its owner move a replica's bytes per sync phase (gradients,
  then weights) over the link between them; a device pays, per link class, the larger of what it
  sends as a follower and receives as an owner.
Objective `interval * T + migration` (migration: the busiest receiver's new weights and moved
optimizer state, against the current placement). Fixed to the hints of the real excerpt, the
model's objective is the estimator's within -2.4% and +3.5% (median +0.4%; summing sync sends and
receipts and charging sends across on NVLink too, it was a median 8.9% over, up to 34%). The plan
is then re-scored by the estimator, with the model's owners or the current ones where they still
hold a replica, whichever it ranks first; the model is a linearisation, not the estimator
itself, so if the estimator ranks the hint higher the hint is returned and `info` says so. Part
of the budget (`REFINE_SHARE`) goes to `planner.refine`, a local search judged by the estimator
itself, on the plan returned: on the real traces at 1 s per layer CP-SAT mostly proves little
beyond its hint, and levelling shares against each device's real communication gains more.
Spare workers (beyond one) refine runner-up hints in forked processes for the whole budget
meanwhile (`refine.ForkedRefines`). Too large instances are decomposed: the hint's split of
experts over nodes is kept and each node's devices are solved on their own (and not refined: a
candidate costs too much there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from ortools.sat.python import cp_model

from cost_models.cluster import Cluster
from cost_models.estimator import A2A_PHASES, SYNC_PHASES, estimate
from cost_models.files import InputError
from planner.baselines import eplb
from planner.construct import hierarchical, mcnaughton, spread_owners
from planner.greedy import greedy
from planner.plan import LayerPlan
from planner.refine import ForkedRefines, refine, split_plans
from planner.score import clean_shares, objective, pick_owner, verdict

BLOCKS = 1000  # token blocks per layer
UNITS = 200_000  # time units in the lower bound: sets the rounding of time coefficients
MAX_CELLS = 2048  # experts x devices above which a layer is decomposed by node
OK = (cp_model.OPTIMAL, cp_model.FEASIBLE)
# of the budget left after the hints, spent on `planner.refine` (estimator-judged local search) of
# the plan the solver returns, on layers small enough to be solved whole
REFINE_SHARE = 0.5
REFINE_EVALS_PER_S = 500  # reproducible mode: candidates per second of that share, not wall time
MIN_REFINE_S = 0.01  # less is not worth the shares' first levelling
STOP_S = 0.004  # wall seconds CP-SAT takes past its time limit to stop, plus reading its solution back
FINISH_S = 0.005  # wall seconds kept for what follows the search: owners re-scored, forks joined, verdicts
NODE_FLOWS = True  # model the inter-node all-to-all per node (False: per-device constant splits)


class _Inst:
    """One (sub)problem in integer units."""

    def __init__(self, cluster: Cluster, devices, load, src, hint_share, cur_x, cur_owner, interval, inter_ok=True):
        d = np.asarray(devices)
        self.G, self.E = len(d), len(load)
        self.interval = interval
        a, b = cluster.compute_a[d], cluster.compute_b[d]
        self.slots = cluster.slots[d]
        self.node = cluster.node_of[d]
        self.nodes = np.unique(self.node)
        total = max(float(load.sum()), 1.0)
        self.U = max(total / BLOCKS, 1e-9)  # tokens per block
        lb = (total + self.E * (a / b).min()) / (1.0 / b).sum()
        self.tau = lb / UNITS if lb > 0 else 1e-9  # seconds per time unit
        q = lambda v: np.rint(np.asarray(v) / self.tau).astype(np.int64)
        self.Lb = np.rint(load / self.U).astype(np.int64)
        self.cb = np.minimum(np.rint(src / self.U).astype(np.int64), self.Lb[None, :])  # [G, E]
        self.a_u, self.b_u = q(a), q(b * self.U)
        inter = cluster.inter_mask[np.ix_(d, d)] if inter_ok else np.zeros((self.G, self.G), bool)
        self.inter = inter
        invb = cluster.inv_beta[np.ix_(d, d)]
        intra = ~inter & ~np.eye(self.G, dtype=bool)
        ci = invb[intra].mean() if intra.any() else 0.0
        co = invb[inter].mean() if inter.any() else 0.0
        tb, P = cluster.expert.token_bytes, cluster.expert.param_bytes
        peer = (~inter & ~np.eye(self.G, dtype=bool)).astype(np.float64)
        from_intra = (src.T @ peer)  # [E, G] tokens of e from same-node peers
        others = np.maximum(load[:, None] - src.T, 0.0)
        f_in = np.divide(from_intra, others, out=np.ones_like(from_intra), where=others > 0).clip(0, 1)
        self.recv_i, self.recv_o = q(tb * self.U * ci * f_in), q(tb * self.U * co * (1 - f_in))
        y = hint_share * load[:, None]
        y_peer = y @ peer
        y_else = y.sum(axis=1, keepdims=True) - y
        t_in = np.divide(y_peer, y_else, out=np.ones_like(y), where=y_else > 0).clip(0, 1).T  # [G, E]
        self.send_i, self.send_o = q(tb * self.U * ci * t_in), q(tb * self.U * co * (1 - t_in))
        # node-aware all-to-all (more than one node): the hierarchical routing sends across nodes
        # exactly max(0, node demand - node service) blocks of each expert out of a node, and as
        # many into the nodes serving more than their own demand
        self.node_ix = np.unique(self.node, return_inverse=True)[1].reshape(-1)
        self.multi_node = NODE_FLOWS and len(self.nodes) > 1 and inter.any()
        self.cost_i, self.cost_o = q(tb * self.U * ci), q(tb * self.U * co)
        node_sum = np.eye(len(self.nodes))[self.node_ix].T  # [K, G]: a [G, E] array's sums per node
        # [K, E] blocks wanted by each node's sources (whole numbers, summed exactly in floats)
        self.Db = node_demand = np.rint(node_sum @ self.cb).astype(np.int64)
        # a source's part of its node's outflow: as the routing rule has it, its part of what the
        # node's sources still send after keeping their tokens on their own replicas (the hint's;
        # by demand where they keep everything)
        rest = np.maximum(src - y.T, 0.0)  # [G, E] tokens not kept local under the hint
        node_rest = node_sum @ rest
        by_demand = self.cb / np.maximum(self.Db[self.node_ix], 1)
        part = np.divide(rest, node_rest[self.node_ix], out=by_demand, where=node_rest[self.node_ix] > 0)
        self.send_out = q(tb * self.U * co * part)  # [G, E] per block leaving the node
        self.send_out_i = q(tb * self.U * ci * part)  # the same blocks at NVLink cost: not sent inside
        # the routing rule spreads a node's inflow over its replicas in proportion to what each
        # takes beyond its own source's tokens: each receives that times the node's inflow over
        # their total, a ratio taken from the hint, in thousandths (rounded down)
        room = node_sum @ np.maximum(y.T - src, 0.0)
        inflow = np.maximum(node_sum @ y.T - node_demand * self.U, 0.0)
        self.inflow_ratio = np.floor(1000 * np.divide(inflow, room, out=np.zeros_like(room), where=room > 0)
                                     .clip(0, 1)).astype(np.int64)  # [K, E]
        self.sync = q(SYNC_PHASES * P * invb)  # [G, G]: a follower on row, its owner on column
        self.lat = q(A2A_PHASES * cluster.alpha[np.ix_(d, d)].sum(axis=1))
        self.mig_new = np.zeros((self.E, self.G), dtype=np.int64)
        self.mig_own = np.zeros((self.E, self.G), dtype=np.int64)
        if cur_x is not None:
            same = ~inter
            for e in range(self.E):
                near = (cur_x[e][None, :] & same).any(axis=1)
                self.mig_new[e] = np.where(cur_x[e], 0, q(P * np.where(near, ci, co if co else ci)))
                if 0 <= cur_owner[e] < self.G:
                    self.mig_own[e] = q(cluster.expert.optimizer_bytes * invb[cur_owner[e]])
                    self.mig_own[e, cur_owner[e]] = 0


def _round_blocks(share, Lb):
    """Integer blocks per replica that sum to Lb per expert (largest remainders)."""
    raw = share * Lb[:, None]
    y = np.floor(raw).astype(np.int64)
    for e in range(len(Lb)):
        short = int(Lb[e] - y[e].sum())
        if short > 0:
            frac = np.where(share[e] > 0, raw[e] - y[e], -1.0)
            y[e, np.argsort(-frac, kind="stable")[:short]] += 1
    return y


class SolveResult(NamedTuple):
    """One (sub)problem's outcome: placement arrays are None when the solver found nothing."""

    status: str
    x: np.ndarray | None
    share: np.ndarray | None
    owner: np.ndarray | None
    objective_s: float | None  # the model's objective, seconds
    bound_s: float | None  # the model's proven bound, seconds
    info: dict


@dataclass
class _Model:
    """The CP-SAT model and the variables a hint fixes and a solution is read from."""

    m: cp_model.CpModel
    x: list
    y: list
    l: dict


def _assignment(m, inst: _Inst, own):
    """Replicas `x`, blocks served `y` and kept local `l`, with slots and owners' replicas."""
    E, G = inst.E, inst.G
    x = [[m.NewBoolVar("") for _ in range(G)] for _ in range(E)]
    y = [[m.NewIntVar(0, int(inst.Lb[e]), "") for _ in range(G)] for e in range(E)]
    l = {}
    for e in range(E):
        m.Add(x[e][int(own[e])] == 1)  # owners are the hint's: its replica stays
        m.Add(sum(y[e]) == int(inst.Lb[e]))
        for g in range(G):
            m.Add(y[e][g] <= int(inst.Lb[e]) * x[e][g])
            if inst.cb[g, e] > 0:
                l[e, g] = m.NewIntVar(0, int(inst.cb[g, e]), "")
                m.Add(l[e, g] <= y[e][g])
                m.Add(l[e, g] <= int(inst.cb[g, e]) * x[e][g])  # redundant, but tightens the LP bound
    for g in range(G):
        m.Add(sum(x[e][g] for e in range(E)) <= int(inst.slots[g]))
    return x, y, l


def _sync_terms(m, inst: _Inst, x, own):
    """Replica sync with fixed owners is linear: in each phase a follower on g and its owner h
    each move a replica over the link between them, and a device pays, per link class, the
    larger of what it sends and what it receives (as the estimator does). Per device, its sync
    time as a list of variables (one per link class it uses)."""
    sends = [[[], []] for _ in range(inst.G)]  # [device][class]: gradient-phase terms sent
    recvs = [[[], []] for _ in range(inst.G)]  # ... and received (the weight phase swaps them)
    for e in range(inst.E):
        h = int(own[e])
        for g in range(inst.G):
            if g != h and inst.sync[g, h] > 0:
                cls = int(inst.inter[g, h])
                sends[g][cls].append(int(inst.sync[g, h]) * x[e][g])
                recvs[h][cls].append(int(inst.sync[g, h]) * x[e][g])
    hi = int(inst.sync.max(initial=0)) * inst.E * inst.G + 1
    sync = [[] for _ in range(inst.G)]
    for g in range(inst.G):
        for cls in (0, 1):
            if sends[g][cls] or recvs[g][cls]:
                v = m.NewIntVar(0, hi, "")
                m.Add(v >= sum(sends[g][cls]))
                m.Add(v >= sum(recvs[g][cls]))
                sync[g].append(v)
    return sync


def _time_cap(inst: _Inst) -> int:
    """An upper bound on any device's time in units: the domain of T and the ports."""
    per_block = int(max(inst.recv_i.max(), inst.recv_o.max(), inst.send_i.max(initial=0), inst.send_o.max(initial=0)))
    return (int(inst.lat.max()) + int(inst.a_u.max()) * inst.E + (int(inst.b_u.max()) + 8 * per_block)
            * int(inst.Lb.sum()) + 2 * int(inst.sync.max(initial=0)) * inst.E * inst.G + 1)


def _step_time(m, inst: _Inst, x, y, l, sync):
    """T >= every device's compute + all-to-all + sync + latency."""
    E, G = inst.E, inst.G
    hi = _time_cap(inst)
    T = m.NewIntVar(0, hi, "T")
    Ai = [m.NewIntVar(0, hi, "") for _ in range(G)]
    Ao = [m.NewIntVar(0, hi, "") for _ in range(G)]
    if inst.multi_node:
        out, z = _node_flows(m, inst, x, y, l)
    for g in range(G):
        rem = [(e, y[e][g] - l[e, g] if (e, g) in l else y[e][g]) for e in range(E)]
        sent = [(e, int(inst.cb[g, e]) - l[e, g]) for e in range(E) if (e, g) in l]
        if inst.multi_node:
            k = int(inst.node_ix[g])
            # receive: remote blocks inside the node at NVLink cost, those from other nodes (z) at
            # InfiniBand cost; send: the source's part of the node's outflow across, its other
            # remote blocks inside
            m.Add(Ai[g] >= sum(int(inst.cost_i) * (v - z[e, g]) for e, v in rem))
            m.Add(Ao[g] >= sum(int(inst.cost_o) * z[e, g] for e in range(E)))
            m.Add(Ai[g] >= sum(int(inst.cost_i) * v for e, v in sent)
                  - sum(int(inst.send_out_i[g, e]) * out[e, k] for e in range(E) if inst.send_out_i[g, e] > 0))
            m.Add(Ao[g] >= sum(int(inst.send_out[g, e]) * out[e, k] for e in range(E) if inst.send_out[g, e] > 0))
        else:
            m.Add(Ai[g] >= sum(int(inst.recv_i[e, g]) * v for e, v in rem))
            m.Add(Ao[g] >= sum(int(inst.recv_o[e, g]) * v for e, v in rem))
            m.Add(Ai[g] >= sum(int(inst.send_i[g, e]) * v for e, v in sent))
            m.Add(Ao[g] >= sum(int(inst.send_o[g, e]) * v for e, v in sent))
        m.Add(T >= int(inst.a_u[g]) * sum(x[e][g] for e in range(E)) + int(inst.b_u[g]) * sum(y[e][g] for e in range(E))
              + A2A_PHASES * (Ai[g] + Ao[g]) + sum(sync[g]) + int(inst.lat[g]))
    return T


def _migration(m, inst: _Inst, x, own):
    """The busiest receiver's new weights, plus the optimizer state moving to the (fixed) owners."""
    E, G = inst.E, inst.G
    moved = np.zeros(G, dtype=np.int64)  # a constant: owners are fixed
    np.add.at(moved, own, inst.mig_own[np.arange(E), own])
    mig = m.NewIntVar(0, int(inst.mig_new.sum() + moved.sum()) + 1, "mig")
    for g in range(G):
        m.Add(mig >= sum(int(inst.mig_new[e, g]) * x[e][g] for e in range(E)) + int(moved[g]))
    return mig


def _build(inst: _Inst, own) -> _Model:
    m = cp_model.CpModel()
    x, y, l = _assignment(m, inst, own)
    T = _step_time(m, inst, x, y, l, _sync_terms(m, inst, x, own))
    m.Minimize(inst.interval * T + _migration(m, inst, x, own))
    return _Model(m, x, y, l)


class _Hint(NamedTuple):
    completed: bool
    model_s: float | None  # the hint's objective in the model, seconds
    wall_s: float


def _add_hint(model: _Model, inst: _Inst, hint_x, hint_share, budget, seed, reproducible) -> _Hint:
    """A complete hint: fix the plan's main variables in a copy, let the solver fill in the rest
    (ports, flows, T) within a fifth of the budget; a partial hint if that fails."""
    x, y, l, m = model.x, model.y, model.l, model.m
    hy = _round_blocks(hint_share, inst.Lb)
    main = [(x[e][g], int(hint_x[e, g])) for e in range(inst.E) for g in range(inst.G)]
    main += [(y[e][g], int(hy[e, g])) for e in range(inst.E) for g in range(inst.G)]
    main += [(v, int(min(inst.cb[g, e], hy[e, g]))) for (e, g), v in l.items()]
    fixed = m.clone()
    for v, val in main:
        fixed.Add(v == val)
    fill = cp_model.CpSolver()
    fill.parameters.num_workers = 1
    fill.parameters.random_seed = int(seed)
    _limit(fill.parameters, 0.2 * float(budget), reproducible)
    ok = fill.Solve(fixed) in OK
    if ok:
        for i in range(len(m.Proto().variables)):
            m.AddHint(m.GetIntVarFromProtoIndex(i), fill.Value(m.GetIntVarFromProtoIndex(i)))
        return _Hint(True, fill.ObjectiveValue() * inst.tau / inst.interval, fill.WallTime())
    for v, val in main:
        m.AddHint(v, val)
    return _Hint(False, None, fill.WallTime())


def _solve(inst: _Inst, hint_x, hint_share, hint_owner, budget, workers, seed, reproducible=False) -> SolveResult:
    """Build, hint and solve the model."""
    t_build = time.perf_counter()
    own = np.asarray(hint_owner)
    model = _build(inst, own)
    hint = _add_hint(model, inst, hint_x, hint_share, budget, seed, reproducible)
    if not reproducible:  # the wall-clock budget covers building and hinting the model (its fill
        # included), and CP-SAT's stop and reading back its solution
        budget = max(float(budget) - (time.perf_counter() - t_build) - STOP_S, 1e-3)
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = max(1, int(workers))
    p.random_seed = int(seed)
    _limit(p, float(budget), reproducible)
    status = solver.Solve(model.m)
    name = solver.StatusName(status)
    spent = time.perf_counter() - t_build
    if status not in OK:
        return SolveResult(name, None, None, None, None, None, {"wall_s": spent, "hint_completed": hint.completed})
    xs = np.array([[solver.Value(v) for v in row] for row in model.x], dtype=bool)
    ys = np.array([[solver.Value(v) for v in row] for row in model.y], dtype=np.float64)
    share = clean_shares(xs, ys / np.maximum(inst.Lb[:, None], 1))
    scale = inst.tau / inst.interval
    return SolveResult(name, xs, share, own, solver.ObjectiveValue() * scale, solver.BestObjectiveBound() * scale,
                       {"wall_s": spent, "hint_model_s": hint.model_s,
                        "model_gap": _gap(solver.ObjectiveValue(), solver.BestObjectiveBound())})


def _node_flows(m, inst: _Inst, x, y, l):
    """Blocks of each expert leaving each node, `out[e, k] = max(demand - service, 0)`, and those
    each device receives from other nodes, `z[e, g]`: together at least the node's inflow
    `service - demand`, each at most the device's remote blocks and at least the hint's ratio of
    them (the routing rule spreads the inflow in proportion to them; above that, the model may
    choose)."""
    E = inst.E
    out, z = {}, {}
    for e in range(E):
        Lb = int(inst.Lb[e])
        for k in range(len(inst.nodes)):
            devs = np.flatnonzero(inst.node_ix == k)
            served = sum(y[e][int(g)] for g in devs)
            d = int(inst.Db[k, e])
            out[e, k] = m.NewIntVar(0, d, "")
            # exactly what leaves, no more: a source's sends inside the node are charged net of it
            m.AddMaxEquality(out[e, k], [d - served, 0])
            # a node without a replica sends all its demand away: redundant for integer x, but it
            # keeps the LP bound from hiding the slow links behind fractional replicas
            m.Add(out[e, k] >= d - d * sum(x[e][int(g)] for g in devs))
            inflow = m.NewIntVar(0, Lb, "")
            m.Add(inflow >= served - d)
            ratio = int(inst.inflow_ratio[k, e])
            for g in devs:
                g = int(g)
                z[e, g] = m.NewIntVar(0, Lb, "")
                room = y[e][g] - l[e, g] if (e, g) in l else y[e][g]
                m.Add(z[e, g] <= room)
                if ratio > 0:  # a block of slack for rounding
                    m.Add(1000 * (z[e, g] + 1) >= ratio * room)
            m.Add(sum(z[e, int(g)] for g in devs) >= inflow)
    return out, z


def _free_links(cluster: Cluster) -> bool:
    """Links cost nothing: no all-to-all, sync or migration time, compute alone counts."""
    return bool((cluster.alpha == 0).all() and (cluster.inv_beta < 1e-24).all())


def _limit(params, seconds: float, reproducible: bool) -> None:
    """The reproducible mode stops on deterministic time (same seed, same plan), wall time being
    only a safety net; otherwise the budget is wall time."""
    seconds = max(seconds, 1e-4)
    if reproducible:
        params.max_deterministic_time = seconds
        params.max_time_in_seconds = max(5.0 * seconds, 0.05)
    else:
        params.max_time_in_seconds = seconds


def _gap(obj, bound):
    return float(obj / bound - 1.0) if bound > 0 else 0.0


def hints(cluster: Cluster, counts, current: LayerPlan | None, interval: int, extra=()):
    """Candidate warm starts, best first by the estimator: greedy, EPLB, wrap-around, the
    node-aware constructions where the greedy did not already weigh them, and on several nodes
    (layers solved whole) `refine.split_plans`; `extra`: more (name, x, share, owner) candidates
    (the offline mode's)."""
    load = counts.sum(axis=0)
    gx, gs, go, ginfo = greedy(cluster, counts, current, interval=interval)
    cands = [("greedy", gx, gs, go)]
    ex, es = eplb(load, cluster.slots, cluster.node_of)
    cands.append(("eplb", ex, es, pick_owner(cluster, ex, es, current)))
    mx, ms = mcnaughton(cluster, load)
    cands.append(("wrap-around", mx, ms, pick_owner(cluster, mx, ms, current)))
    cands += list(extra)
    if not any(k.startswith("nodes+") for k in ginfo.get("candidates", {})):
        for name, hx, hs in hierarchical(cluster, counts):  # the greedy skipped them (too large)
            own = pick_owner(cluster, hx, hs, current)
            base = estimate(cluster, counts, hx, hs).total
            cands += [(name, hx, hs, own), (name + "/owners", hx, hs, spread_owners(cluster, hx, base, own))]
    if cluster.num_nodes > 1 and counts.shape[1] * cluster.num_devices <= MAX_CELLS:
        cands += split_plans(cluster, counts)
    scored = sorted(((objective(cluster, counts, x, s, o, current, interval), i) for i, (_, x, s, o) in
                     enumerate(cands)))
    return [(cands[i], obj) for obj, i in scored], ginfo


def ilp(cluster: Cluster, counts: np.ndarray, current: LayerPlan | None = None, *, time_budget: float = 1.0,
        workers: int = 1, seed: int = 0, interval: int = 50, reproducible: bool = False, extra_hints=()):
    """(x, share, owner, info). Falls back to the greedy plan if the solver returns no solution.

    `time_budget` is wall-clock seconds for the whole call, hints included. `reproducible`: one
    worker stopping on CP-SAT's deterministic time instead, so the same seed gives the same plan
    on any machine load (wall time may then exceed the budget)."""
    if reproducible:
        workers = 1
    if not time_budget > 0:
        raise InputError(f"the time budget must be positive seconds, got {time_budget}")
    t0 = time.perf_counter()
    ranked, ginfo = hints(cluster, counts, current, interval, extra_hints)
    (hname, hx, hs, ho), hobj = ranked[0]
    greedy_plan = next(c for c, _ in ranked if c[0] == "greedy")
    # on the wall clock the search ends FINISH_S before the budget, for what follows it (the
    # reproducible mode's budget must not depend on the wall clock)
    end = t0 + time_budget - FINISH_S
    left = time_budget if reproducible else max(end - time.perf_counter(), 1e-3)
    load = counts.sum(axis=0).astype(np.float64)
    E, G = len(load), cluster.num_devices
    refine_left = REFINE_SHARE * left if E * G <= MAX_CELLS else 0.0
    left -= refine_left
    cur_x = current.replicas() if current is not None else None
    cur_owner = current.owner if current is not None else None
    info = {"solver": "ilp", "hint": hname, "hint_objective": hobj, "time_budget": time_budget,
            "workers": workers, "seed": seed, "reproducible": reproducible}
    # spare workers refine the runner-up hints meanwhile, where the plan is refined (not in
    # reproducible mode: its result must not depend on the machine)
    others = [] if reproducible or E * G > MAX_CELLS or _free_links(cluster) else _other_starts(ranked, workers - 1)
    with ForkedRefines(cluster, counts, current, interval, [c[1:] for c in others], end) as forked:
        info.update(refine_starts=1 + len(forked.children))
        if E * G <= MAX_CELLS or cluster.num_nodes == 1:
            inst = _Inst(cluster, np.arange(G), load, counts, hs, cur_x, cur_owner, interval)
            r = _solve(inst, hx, hs, ho, left, max(workers - len(forked.children), 1), seed, reproducible)
            status, x, share, owner = r.status, r.x, r.share, r.owner
            info.update(status=status.lower(), decomposed=False, **r.info)
            if x is not None:
                # on free links (compute alone) the model is the estimator, up to block rounding; with
                # links, owners and routing it is not, and its bound is reported apart (planner.score)
                info.update(model_objective_s=r.objective_s, bound_s=r.bound_s, bound_valid=_free_links(cluster))
        else:
            status, x, share, owner, extra = _by_node(cluster, counts, load, hx, hs, ho, cur_x, cur_owner, interval,
                                                      left, workers, seed, reproducible)
            info.update(status=status, decomposed=True, **extra)
        if x is None and info.get("hint_completed"):  # no better solution in time; the hint stands
            info.update(returned="hint")
            x, share, owner = hx, hs, ho
        elif x is None:  # nothing in time, or a solver failure: the greedy plan, saying so
            _, x, share, owner = greedy_plan
            info.update(fallback=True, returned="greedy")
        else:
            owner, obj = _owners(cluster, counts, current, interval, x, share, owner)
            if obj > hobj:
                info.update(returned="hint", ilp_objective=obj)
                x, share, owner = hx, hs, ho
            else:
                info.update(returned="ilp")
        if E * G > MAX_CELLS:  # decomposed: a candidate costs too much there for the time left to pay
            return x, share, owner, info
        if info["status"] == "optimal" and _free_links(cluster):
            return x, share, owner, info  # free links: the model is the estimator, optimal (or its hint, no worse)
        x, share, owner, info = _refined(cluster, counts, current, interval, x, share, owner, info,
                                         refine_left if reproducible else end - time.perf_counter(),
                                         reproducible)
        if forked.children:
            v = verdict(cluster, counts, x, share, owner, current, interval)
            x, v, won = forked.best(x, v)
            if won:
                share, owner = v.share, v.owner
                info.update(refined=True, refine_start=others[won - 1][0])
        return x, share, owner, info


def _other_starts(ranked, n: int) -> list:
    """Up to `n` of the ranked hints after the first, best first, each with a placement unlike the
    first's and the others'."""
    seen, out = {np.asarray(ranked[0][0][1], bool).tobytes()}, []
    for (name, hx, hs, ho), _ in ranked[1:]:
        key = np.asarray(hx, bool).tobytes()
        if len(out) < n and key not in seen:
            seen.add(key)
            out.append((name, hx, hs, ho))
    return out


def _refined(cluster, counts, current, interval, x, share, owner, info, seconds, reproducible):
    """The plan after `planner.refine`'s local search in the time left (reproducible: a fixed
    number of candidates per second of it instead), noted in `info`."""
    if seconds < MIN_REFINE_S:
        return x, share, owner, info
    t = time.perf_counter()
    rx, v, evals = refine(cluster, counts, current, interval, x, share, owner,
                          seconds=None if reproducible else seconds,
                          max_evals=int(REFINE_EVALS_PER_S * seconds) if reproducible else None)
    info.update(refine_evals=evals, refine_wall_s=time.perf_counter() - t)
    if v.objective < objective(cluster, counts, x, share, owner, current, interval):
        info.update(refined=True)
        return rx, v.share, v.owner, info
    return x, share, owner, info


def _owners(cluster, counts, current, interval, x, share, owner):
    """(owners, objective): the model's owners (those it priced sync and migration with) or, where
    the current owner still holds a replica, the current one (no optimizer state moves), whichever
    the estimator ranks first; `pick_owner`'s when the model had none (decomposed layers)."""
    if owner is None:
        owner = pick_owner(cluster, x, share, current)
    options = [owner]
    if current is not None:
        kept = np.where(x[np.arange(len(owner)), current.owner], current.owner, owner)
        if not np.array_equal(kept, owner):  # the same owners: one estimate suffices
            options.append(kept)
    scored = [(objective(cluster, counts, x, share, o, current, interval), i) for i, o in enumerate(options)]
    obj, i = min(scored)
    return options[i], obj


def _by_node(cluster, counts, load, hx, hs, ho, cur_x, cur_owner, interval, budget, workers, seed,
             reproducible=False):
    """Nodes then devices: keep the hint's share of each expert per node, re-solve each node."""
    nodes = np.unique(cluster.node_of)
    x = np.zeros_like(hx)
    share = np.zeros_like(hs)
    statuses, gaps, wall = [], [], 0.0
    deadline = time.perf_counter() + budget
    for k, n in enumerate(nodes):
        devs = np.flatnonzero(cluster.node_of == n)
        ns = hs[:, devs].sum(axis=1)  # the node's share of each expert
        experts = np.flatnonzero(hx[:, devs].any(axis=1))
        if not len(experts):
            continue
        sub_load = load[experts] * ns[experts]
        sub_src = np.minimum(counts[np.ix_(devs, experts)], sub_load[None, :])
        sub_hs = hs[np.ix_(experts, devs)] / np.maximum(ns[experts, None], 1e-300)
        sub_hs = clean_shares(hx[np.ix_(experts, devs)], sub_hs)
        sub_cx = cur_x[np.ix_(experts, devs)] if cur_x is not None else None
        sub_co = None
        if cur_owner is not None:
            pos = {int(g): i for i, g in enumerate(devs)}
            sub_co = np.array([pos.get(int(cur_owner[e]), -1) for e in experts])
        sub_ho = np.array([int(np.argmax(sub_hs[i])) for i in range(len(experts))])
        inst = _Inst(cluster, devs, sub_load, sub_src, sub_hs, sub_cx, sub_co, interval, inter_ok=False)
        # wall clock: what is left to the deadline, shared by the nodes still to solve
        left = budget / len(nodes) if reproducible else (deadline - time.perf_counter()) / (len(nodes) - k)
        r = _solve(inst, hx[np.ix_(experts, devs)], sub_hs, sub_ho, max(left, 1e-3), workers, seed, reproducible)
        sx, ss, extra = r.x, r.share, r.info
        statuses.append(r.status.lower())
        wall += extra["wall_s"]
        if sx is None:
            sx, ss = hx[np.ix_(experts, devs)], sub_hs
        else:
            gaps.append(extra["model_gap"])
        x[np.ix_(experts, devs)] = sx
        share[np.ix_(experts, devs)] = ss * ns[experts, None]
    worst = next((s for s in ("unknown", "model_invalid", "infeasible", "feasible") if s in statuses), "optimal")
    if statuses and all(s not in ("optimal", "feasible") for s in statuses):
        return worst, None, None, None, {"wall_s": wall, "hint_completed": True}
    return worst, x, clean_shares(x, share), None, {"wall_s": wall, "model_gap": max(gaps, default=0.0),
                                                    "nodes": len(nodes)}

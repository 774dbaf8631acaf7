"""Every bound in planner/bounds.py is checked against brute force: on tiny clusters, no enumerated
plan (every placement, every owner choice, several share vectors) may score below it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cost_models.cluster import INTER, INTRA, Cluster, ComputeModel, Device, ExpertShape, Link
from cost_models.estimator import lower_bound
from planner import bounds
from planner.plan import LayerPlan, static_layer
from planner.score import objective
from planner.solve import plan_layer
from tests.planner_helpers import spread


def slow_cluster(nodes=2, per_node=(2, 1), slots=2, a=2e-6, width=16):
    """Links slow enough that all-to-all, sync and migration weigh as much as compute (more so
    with a wider expert: its weights grow as width^2, its tokens as width)."""
    devices, i = [], 0
    for n in range(nodes):
        for _ in range(per_node[n]):
            devices.append(Device(i, n, "t", 2**34, slots, ComputeModel(a, 1e-6)))
            i += 1
    links = {INTRA: Link(1e-6, 1e8), INTER: Link(3e-6, 2e7)} if nodes > 1 else {INTRA: Link(1e-6, 1e8)}
    return Cluster("slow", tuple(devices), ExpertShape(width, width, "bf16"), links)


def brute_min(cluster, counts, current, interval, draws=3, seed=0):
    """The smallest objective over every placement with all slots' subsets, every owner, and even
    plus random shares."""
    rng = np.random.default_rng(seed)
    G, E = cluster.num_devices, counts.shape[1]
    subsets = [s for k in range(int(cluster.slots.max()) + 1) for s in itertools.combinations(range(E), k)]
    best = np.inf
    for choice in itertools.product(subsets, repeat=G):
        x = np.zeros((E, G), bool)
        for g, sub in enumerate(choice):
            x[list(sub), g] = True
        if not x.any(axis=1).all():
            continue
        shares = [x / x.sum(axis=1, keepdims=True)]
        for _ in range(draws):
            w = np.where(x, rng.random(x.shape) + 1e-3, 0.0)
            shares.append(w / w.sum(axis=1, keepdims=True))
        for own in itertools.product(*[np.flatnonzero(x[e]) for e in range(E)]):
            own = np.array(own)
            for sh in shares:
                best = min(best, objective(cluster, counts, x, sh, own, current, interval))
    return best


CASES = [
    ("2 nodes, hot expert", slow_cluster(), [300, 40, 20], 0),
    ("2 nodes, even", slow_cluster(), [90, 80, 70], 1),
    ("1 node", slow_cluster(nodes=1, per_node=(3,)), [200, 50, 10], 2),
    ("2 nodes, one very hot", slow_cluster(per_node=(2, 1)), [900, 10, 10], 3),
    ("1 node, one very hot", slow_cluster(nodes=1, per_node=(3,)), [900, 10, 10], 3),
    # more experts than a device holds: every source sends most of its tokens, whatever it hosts
    ("1 node, four experts", slow_cluster(nodes=1, per_node=(2,)), [120, 100, 80, 60], 4),
    ("2 nodes, four experts", slow_cluster(per_node=(2, 2), slots=1), [300, 100, 80, 60], 5),
]


@pytest.mark.parametrize("name,cluster,load,seed", CASES, ids=[c[0] for c in CASES])
def test_bounds_never_exceed_brute_force(name, cluster, load, seed):
    counts = spread(load, cluster.num_devices, seed=seed).astype(np.float64)
    current = static_layer(len(load), cluster.slots)
    for cur in (None, current):
        best = brute_min(cluster, counts, cur, 5)
        upper = best * 1.5
        found = {"compute": bounds.compute_bound(cluster, counts),
                 "traffic": bounds.traffic_bound(cluster, counts),
                 "lp": bounds.lp_bound(cluster, counts, cur, 5, upper=upper),
                 "mip": bounds.Relaxation(cluster, counts, cur, 5, upper=upper).solve(20.0)[0]}
        found["node"] = bounds.NodeRelaxation(cluster, counts, cur, 5, upper=upper).solve(20.0)[0]
        for k, v in found.items():
            assert v <= best * (1 + 1e-9), (name, cur is not None, k, v, best)
        # and they say something: the communication-aware ones beat perfect compute balance
        assert found["mip"] > lower_bound(cluster, counts) * 1.05, (name, found)
        assert found["mip"] >= max(found["compute"], found["traffic"]) * (1 - 1e-5)
        if cur is None and name != "1 node":
            assert found["traffic"] > found["compute"] * 1.01, found
            assert found["node"] >= found["traffic"] * (1 - 1e-5), found
        if name == "2 nodes, even":  # a node cannot host all three: what crosses or syncs counts
            assert found["node"] > found["traffic"] * 1.3, found


def _current(experts_on: dict[int, int], owner) -> LayerPlan:
    """A placement in force on `slow_cluster()`: expert -> the one device holding it."""
    x = np.zeros((3, 3), bool)
    for e, g in experts_on.items():
        x[e, g] = True
    return LayerPlan.from_matrices(x, x / x.sum(axis=1, keepdims=True), np.asarray(owner), 2)


# Placements in force that make migration lumps bind: node 1 (device 2) holds nothing and its
# source wants expert 0 (new replicas copied across from the old owner); expert 0 held only on
# node 1 while node 0 wants it (its owner may move across).
LUMP_CASES = [
    ("node 1 empty", _current({0: 0, 1: 0, 2: 1}, [0, 0, 1]), [[20, 20, 10], [20, 10, 10], [400, 10, 5]], 1),
    ("owner across", _current({0: 2, 1: 0, 2: 1}, [2, 0, 1]), [[300, 20, 10], [300, 10, 10], [0, 0, 0]], 5),
]


@pytest.mark.parametrize("name,current,counts,interval", LUMP_CASES, ids=[c[0] for c in LUMP_CASES])
def test_node_bound_with_migration_lumps_never_exceeds_brute_force(name, current, counts, interval):
    """The node relaxation's device-level migration rows (an old owner's inter-node sends, a new
    owner's receive, each on one device) stay below every enumerated plan."""
    cluster = slow_cluster()
    counts = np.asarray(counts, dtype=np.float64)
    best = brute_min(cluster, counts, current, interval)
    node = bounds.NodeRelaxation(cluster, counts, current, interval, upper=best * 1.5).solve(20.0)[0]
    assert node <= best * (1 + 1e-9), (name, node, best)
    assert node >= bounds.quick_bound(cluster, counts) * (1 - 1e-6)


def test_node_bound_counts_what_owners_receive_beyond_their_own_sends():
    """With one slot per device an owner follows nothing, so none of its followers' gradients
    overlap a send of its own, inside its node as across: the node bound charges them (without
    the owners' receipts inside the node it is 0.669 of the optimum here) and stays valid."""
    cluster = slow_cluster(per_node=(2, 2), slots=1, width=32)
    counts = spread([900, 30, 20], cluster.num_devices, seed=0).astype(np.float64)
    for cur in (None, static_layer(3, cluster.slots)):
        best = brute_min(cluster, counts, cur, 5)
        node = bounds.NodeRelaxation(cluster, counts, cur, 5, upper=best * 1.5).solve(20.0)[0]
        assert node <= best * (1 + 1e-9), (cur is not None, node, best)
        if cur is None:
            assert node >= 0.7 * best, (node, best)


def test_largest_is_the_head_of_a_descending_sort():
    rng = np.random.default_rng(1)
    for shape, k in (((5, 30), 4), ((3, 7), 7), ((2, 4), 9), ((6, 50), 1)):
        a = rng.integers(0, 6, shape).astype(float)  # many ties
        want = np.sort(a, axis=1)[:, ::-1][:, :k]
        assert np.array_equal(bounds._largest(a, k), want)


def test_balance_is_the_exact_optimum_of_its_lp():
    """`_balance` (the traffic bound's core) finds the smallest level exactly, from below: it
    matches the linear program it solves (GLOP), never above it and not looser than rounding."""
    from ortools.linear_solver import pywraplp
    rng = np.random.default_rng(7)
    for case in range(40):
        n = int(rng.integers(1, 12 if case % 2 else 40))
        weight = rng.integers(1, 4, n).astype(float)
        base, b = rng.uniform(0, 2, n), rng.uniform(0.5, 2, n)
        k = rng.uniform(0, 3, n) * (rng.random() < 0.8)
        C = rng.uniform(0, 10, n)
        K = rng.uniform(0, 1, n) * C
        N = float(C.sum())
        got = bounds._balance(weight, base, b, k, C, K, N)
        lp = pywraplp.Solver.CreateSolver("GLOP")
        T, shares = lp.NumVar(0, lp.infinity(), "T"), []
        for i in range(n):  # u >= max(C - L, t - L), L <= min(t, K): the most kept local
            t, L, u = lp.NumVar(0, N, ""), lp.NumVar(0, K[i], ""), lp.NumVar(0, lp.infinity(), "")
            lp.Add(L <= t)
            lp.Add(u >= C[i] - L)
            lp.Add(u >= t - L)
            lp.Add(weight[i] * T >= base[i] + b[i] * t + k[i] * u)
            shares.append(t)
        lp.Add(sum(shares) == N)
        lp.Minimize(T)
        assert lp.Solve() == pywraplp.Solver.OPTIMAL
        opt = T.solution_value()
        assert opt * (1 - 1e-7) <= got <= opt * (1 + 1e-9) + 1e-12


def test_mip_bound_is_tight_on_a_tiny_case():
    """Solved to the end on a tiny case, the relaxation's bound comes within a few percent of the
    brute-force optimum (it is exact but for free routing and the cheapest link per class)."""
    cluster = slow_cluster()
    counts = spread([300, 40, 20], cluster.num_devices, seed=0).astype(np.float64)
    cur = static_layer(3, cluster.slots)
    best = brute_min(cluster, counts, cur, 5)
    bound, plan, status = bounds.Relaxation(cluster, counts, cur, 5, upper=best * 1.5).solve(20.0)
    assert status == "optimal"
    assert bound >= 0.8 * best, (bound, best)
    x, y, own = plan
    assert x.any(axis=1).all() and (x.sum(axis=0) <= cluster.slots).all() and x[np.arange(3), own].all()


def test_upper_caps_the_bound():
    """Below any plan the relaxations are infeasible: no plan beats `upper`, which is then the bound
    itself, in seconds (not in the solver's time units)."""
    cluster = slow_cluster()
    counts = spread([300, 40, 20], cluster.num_devices, seed=0).astype(np.float64)
    tiny = bounds.compute_bound(cluster, counts) * 0.5
    assert bounds.lp_bound(cluster, counts, None, 5, upper=tiny) == pytest.approx(tiny, rel=1e-5)
    for model in (bounds.Relaxation, bounds.NodeRelaxation):
        bound, _, status = model(cluster, counts, None, 5, upper=tiny).solve(5.0)
        assert status == "infeasible" and bound == pytest.approx(tiny, rel=1e-5), (model.__name__, bound, tiny)


def test_plans_report_a_valid_bound():
    """A plan's `proven_bound_s` is the max of the valid bounds, at least the traffic bound, and at
    most the plan's objective."""
    cluster = slow_cluster()
    counts = spread([300, 40, 20], cluster.num_devices, seed=0)
    cur = static_layer(3, cluster.slots)
    for solver in ("greedy", "eplb", "ilp"):
        lp = plan_layer(cluster, counts, cur, solver=solver, time_budget=0.5, interval=5)
        i = lp.info
        assert i["proven_bound_s"] >= bounds.traffic_bound(cluster, counts) * (1 - 1e-12)
        assert i["proven_bound_s"] <= i["objective"] * (1 + 1e-12)
        assert i["gap"] == pytest.approx(i["objective"] / i["proven_bound_s"] - 1)


def test_ilp_reports_its_model_bound_apart():
    """On real links the ILP's model bound is not a bound on the estimator's objective: it is kept
    as `model_bound_s`, and `proven_bound_s` is the max of the valid ones."""
    cluster = slow_cluster()
    counts = spread([300, 40, 20], cluster.num_devices, seed=0)
    lp = plan_layer(cluster, counts, static_layer(3, cluster.slots), solver="ilp", time_budget=0.5, interval=5)
    assert "model_bound_s" in lp.info
    valid = max(lower_bound(cluster, counts), bounds.quick_bound(cluster, counts))
    assert lp.info["proven_bound_s"] == pytest.approx(valid)


def test_polish_never_worsens_and_reports_its_objective():
    from experiments.offline import polish
    from planner.greedy import greedy
    cluster = slow_cluster()
    counts = spread([300, 40, 20], cluster.num_devices, seed=0).astype(np.float64)
    cur = static_layer(3, cluster.slots)
    x, s, o, _ = greedy(cluster, counts, cur, interval=5)
    px, ps, po, v = polish(cluster, counts, cur, 5, x, s, o)
    assert (px == x).all() and v <= objective(cluster, counts, x, s, o, cur, 5) + 1e-15
    assert v == pytest.approx(objective(cluster, counts, px, ps, po, cur, 5))
    assert px[np.arange(3), po].all() and np.allclose(ps.sum(axis=1), 1) and (ps[~px] == 0).all()


def test_relaxation_at_a_fixed_plan_is_just_below_the_estimate():
    """With replicas, owners and tokens fixed to a plan, the relaxation is that plan's estimate with
    free routing and the cheapest links: never above it, and close to it (it is the same model)."""
    rng = np.random.default_rng(4)
    cluster = slow_cluster(per_node=(2, 2))
    counts = spread([300, 120, 60, 20], cluster.num_devices, seed=1).astype(np.float64)
    cur = static_layer(4, cluster.slots)
    for _ in range(6):
        x = rng.random((4, cluster.num_devices)) < 0.4
        x[np.arange(4), rng.integers(0, cluster.num_devices, 4)] = True
        x &= np.cumsum(x, axis=0) <= 2  # two slots per device
        if not x.any(axis=1).all():
            continue
        sh = np.where(x, rng.random(x.shape) + 0.1, 0.0)
        sh /= sh.sum(axis=1, keepdims=True)
        own = np.array([rng.choice(np.flatnonzero(r)) for r in x])
        est = objective(cluster, counts, x, sh, own, cur, 5)
        rel = bounds.Relaxation(cluster, counts, cur, 5, integer=False)
        L = counts.sum(axis=0) / rel.U
        for e in range(4):
            for g in range(cluster.num_devices):
                rel.x[e][g].SetBounds(float(x[e, g]), float(x[e, g]))
                rel.o[e][g].SetBounds(float(own[e] == g), float(own[e] == g))
                rel.y[e][g].SetBounds(sh[e, g] * L[e] * (1 - 1e-9), sh[e, g] * L[e] * (1 + 1e-9))
        v = rel.solve(10.0)[0]
        assert v <= est * (1 + 1e-6), (v, est)
        assert v >= 0.85 * est, (v, est)

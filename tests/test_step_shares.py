"""Per-step shares: the LP's makespan is the true optimum (checked by bisection over max-flow
feasibility, an independent method), equal inputs give bit-equal shares whatever was solved
before, and the share rule falls back to the plan's shares, saying so once."""

from dataclasses import replace

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.cluster import ComputeModel, Link
from cost_models.estimator import compute_makespan, estimate
from cost_models.presets import local_cpu
from planner.step_shares import ShareRule, StepShares


def cluster_of(num_dev, rng):
    c = local_cpu(slots=3, world_size=num_dev)
    a = rng.uniform(1e-4, 1e-3, num_dev)
    b = rng.uniform(1e-6, 4e-6, num_dev)  # heterogeneous devices
    devices = [replace(d, compute=ComputeModel(float(ai), float(bi))) for d, ai, bi in zip(c.devices, a, b)]
    fast = {k: Link(0.0, 1e15) for k in c.links}  # links that cost next to nothing: compute decides
    return replace(c, devices=devices, links=fast)


def flow_makespan(cluster, counts, x):
    """The optimal makespan by bisection: T is feasible when a max flow from experts to devices
    with capacities (T - a_g * replicas_g) / b_g carries every token."""
    total = counts.sum(axis=0).astype(float)
    a, b = cluster.compute_a, cluster.compute_b
    fixed = a * x.sum(axis=0)

    def feasible(t):
        g = nx.DiGraph()
        for e in range(x.shape[0]):
            g.add_edge("s", ("e", e), capacity=total[e])
            for d in np.flatnonzero(x[e]):
                g.add_edge(("e", e), ("d", d), capacity=float("inf"))
        for d in range(x.shape[1]):
            if t < fixed[d]:
                return False
            g.add_edge(("d", d), "t", capacity=(t - fixed[d]) / b[d])
        return nx.maximum_flow_value(g, "s", "t") >= total.sum() * (1 - 1e-12)

    lo, hi = fixed.max(), fixed.max() + total.sum() * b.max()
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
    return hi


def random_placement(rng, num_exp, num_dev):
    x = rng.random((num_exp, num_dev)) < 0.35
    x[np.arange(num_exp), rng.integers(0, num_dev, num_exp)] = True
    return x


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.integers(2, 5), st.integers(1, 6))
def test_lp_makespan_is_the_optimum(seed, num_dev, num_exp):
    rng = np.random.default_rng(seed)
    cluster = cluster_of(num_dev, rng)
    x = random_placement(rng, num_exp, num_dev)
    counts = rng.integers(0, 500, (num_dev, num_exp))
    lp = StepShares(cluster, x)
    share = lp.solve(counts)
    best = flow_makespan(cluster, counts, x)
    assert lp.makespan() == pytest.approx(best, rel=1e-6)
    assert compute_makespan(cluster, counts, x, share) == pytest.approx(best, rel=1e-6)
    assert np.allclose(share.sum(axis=1), 1.0) and (share >= 0).all()
    assert (share[~x] == 0).all()


def test_shares_do_not_depend_on_earlier_solves():
    rng = np.random.default_rng(3)
    cluster = cluster_of(4, rng)
    x = random_placement(rng, 6, 4)
    steps = [rng.integers(0, 400, (4, 6)) for _ in range(5)]
    warm = StepShares(cluster, x)
    for counts in steps:
        got = warm.solve(counts)
        assert np.array_equal(got, StepShares(cluster, x).solve(counts))  # bit-equal to a fresh model


def test_per_step_shares_beat_stale_plan_shares():
    rng = np.random.default_rng(5)
    cluster = cluster_of(4, rng)
    x = random_placement(rng, 6, 4)
    stale = np.where(x, rng.random(x.shape) + 0.1, 0.0)
    stale /= stale.sum(axis=1, keepdims=True)
    counts = rng.integers(0, 400, (4, 6))
    rule = ShareRule(cluster)
    fresh = rule(counts, x, stale)
    assert fresh is not stale and rule.stats()["adapted"] == 1
    assert compute_makespan(cluster, counts, x, fresh) <= compute_makespan(cluster, counts, x, stale) + 1e-12
    assert estimate(cluster, counts, x, fresh).step_time <= estimate(cluster, counts, x, stale).step_time
    assert ShareRule(cluster, "plan")(counts, x, stale) is stale


def test_a_failing_lp_falls_back_to_the_plan_shares_and_says_so_once(monkeypatch):
    rng = np.random.default_rng(1)
    cluster = cluster_of(3, rng)
    x = random_placement(rng, 4, 3)
    plan = x / x.sum(axis=1, keepdims=True)
    said = []
    monkeypatch.setattr(StepShares, "solve", lambda self, counts: None)
    rule = ShareRule(cluster, warn=said.append)
    for _ in range(3):
        assert rule(rng.integers(0, 9, (3, 4)), x, plan) is plan
    assert len(said) == 1 and "plan's shares" in said[0]
    assert rule.stats()["failures"] == 3


def test_unknown_dispatch_mode_is_refused():
    with pytest.raises(ValueError, match="dispatch mode"):
        ShareRule(local_cpu(slots=2), "lp")


def test_the_estimator_keeps_the_plan_shares_when_moving_tokens_costs_more():
    # Two devices, each holding a replica of expert 0 and all of its own tokens. Per-step shares
    # would even out compute by sending tokens across a link so slow that the plan's shares,
    # which keep every token home, are faster: the rule keeps them.
    base = local_cpu(slots=2, world_size=2)
    slow = replace(base, links={k: Link(0.0, 1e3) for k in base.links})
    x = np.array([[True, True]])
    plan = np.array([[0.8, 0.2]])
    counts = np.array([[800], [200]])
    rule = ShareRule(slow)
    assert rule(counts, x, plan) is plan
    assert rule.stats()["kept_plan"] == 1 and rule.stats()["adapted"] == 0
    fast = ShareRule(base)
    assert fast(counts, x, plan) is not plan  # with cheap links the LP's even split wins

import numpy as np
import pytest

from cost_models.estimator import estimate
from cost_models.files import InputError
from planner.baselines import drop_over_capacity, eplb
from planner.eplb_mapping import from_eplb
from planner.plan import static_layer
from planner.solve import make_plan, plan_layer, predict
from planner.solvers import SOLVERS
from tests.planner_helpers import make_cluster, spread

# DeepSeek EPLB's README example: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
EPLB_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
EPLB_PHY2LOG = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                         [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def gpu_tokens(load, share):
    return (np.asarray(load, float)[:, None] * share).sum(axis=0)


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "ilp"])
def test_every_solver_gives_a_valid_scored_plan(solver):
    c = make_cluster(nodes=2, per_node=3, slots=3, a=1e-5, fast=False)
    counts = spread([900, 50, 300, 10, 10, 700, 40, 0], 6, seed=1)
    lp = plan_layer(c, counts, solver=solver)
    lp.validate(c.slots)
    for key in ("solver", "status", "objective", "step_time_s", "migration_s", "lower_bound", "gap",
                "solve_time_s", "fallback", "balance"):
        assert key in lp.info
    est = estimate(c, counts, lp.replicas(), lp.shares(), lp.owner)
    assert lp.info["step_time_s"] == pytest.approx(est.step_time)
    assert lp.info["objective"] >= lp.info["lower_bound"] * (1 - 1e-9)


def test_greedy_is_deterministic_and_cuts_a_skewed_step_by_more_than_half():
    c = make_cluster(nodes=2, per_node=4, slots=3, a=1e-5, fast=False)
    counts = spread([5000, 100, 900, 30, 30, 2000, 400, 10, 10, 10, 600, 80], 8, seed=3)
    a = plan_layer(c, counts, solver="greedy")
    b = plan_layer(c, counts, solver="greedy")
    assert np.array_equal(a.assign, b.assign) and np.allclose(a.share, b.share)
    static = plan_layer(c, counts, solver="static")
    # measured: 1.61 ms against static's 5.57 ms; greedy returning its input would tie static
    assert a.info["objective"] < 0.5 * static.info["objective"]
    assert a.info["objective"] == pytest.approx(
        estimate(c, counts, a.replicas(), a.shares(), a.owner).step_time)  # no current plan: no migration


def test_greedy_moves_experts_only_when_the_migration_pays_off_over_the_interval():
    c = make_cluster(nodes=1, per_node=4, slots=2, a=1e-5, fast=False)
    counts = spread([400, 380, 420, 410], 4)  # nearly balanced: a move gains little per step
    cur = static_layer(4, c.slots)
    once = plan_layer(c, counts, cur, solver="greedy", interval=1)
    assert np.array_equal(once.assign, cur.assign) and once.info["migration_s"] == 0.0
    long = plan_layer(c, counts, cur, solver="greedy", interval=1000)
    assert not np.array_equal(long.assign, cur.assign) and long.info["migration_s"] > 0
    assert long.info["step_time_s"] < once.info["step_time_s"]


def test_our_eplb_reproduces_the_published_example():
    c = make_cluster(nodes=2, per_node=4, slots=2)
    published = from_eplb(EPLB_PHY2LOG, 8, 12)
    for i in range(2):
        x, share = eplb(EPLB_WEIGHT[i], c.slots, c.node_of, groups=4)
        assert np.allclose(np.sort(gpu_tokens(EPLB_WEIGHT[i], share)),
                           np.sort(gpu_tokens(EPLB_WEIGHT[i], published.layers[i].shares())))


@pytest.mark.parametrize("solver", ["greedy", "ilp"])
def test_eplb_readme_regression_busiest_gpu(solver):
    c = make_cluster(nodes=2, per_node=4, slots=2)
    published = from_eplb(EPLB_PHY2LOG, 8, 12)
    for i in range(2):
        counts = spread(EPLB_WEIGHT[i], 8, seed=i)
        lp = plan_layer(c, counts, solver=solver, time_budget=1.0, reproducible=True)
        ours = gpu_tokens(EPLB_WEIGHT[i], lp.shares()).max()
        theirs = gpu_tokens(EPLB_WEIGHT[i], published.layers[i].shares()).max()
        assert ours <= theirs + 1e-6


def test_capacity_dropping_counts_what_it_drops():
    counts = np.array([[10, 0, 2], [4, 4, 4]])
    x = np.eye(3, dtype=bool)
    kept, dropped = drop_over_capacity(counts, x, x.astype(float), capacity_factor=1.0)
    # source 0 has 12 tokens: capacity 4 per expert; source 1 has 12: capacity 4
    assert kept.tolist() == [[4, 0, 2], [4, 4, 4]]
    assert dropped == 6
    # the planner's capacity baseline: the same placement, the default factor 1.25 (capacity 5)
    lp = plan_layer(make_cluster(per_node=3, slots=1), counts, solver="capacity")
    assert lp.info["dropped_tokens"] == 5 and lp.info["dropped_fraction"] == pytest.approx(5 / 24)
    with pytest.raises(InputError, match="capacity factor"):
        drop_over_capacity(counts, x, x, 0.0)


def test_predictors():
    h = np.arange(3 * 1 * 2 * 2, dtype=float).reshape(3, 1, 2, 2)
    assert np.array_equal(predict(h, "last"), h[-1])
    assert np.allclose(predict(h, "mean", window=2), h[1:].mean(axis=0))
    assert np.allclose(predict(h, "ema", ema=1.0), h[-1])
    assert np.allclose(predict(h, "ema", ema=0.5), 0.5 * h[2] + 0.25 * h[1] + 0.25 * h[0])
    with pytest.raises(InputError, match="unknown predictor"):
        predict(h, "oracle")


def test_make_plan_plans_every_layer():
    c = make_cluster(nodes=1, per_node=3, slots=2)
    loads = np.stack([spread([30, 20, 10, 5], 3, seed=s) for s in range(2)])
    p = make_plan(c, loads, solver="greedy")
    assert len(p.layers) == 2 and p.validate()
    q = make_plan(c, loads, p, solver="eplb")
    assert all("migration_s" in l.info for l in q.layers)


@pytest.mark.parametrize("counts, cluster_kw, match", [
    (np.ones((3, 7)), dict(per_node=3, slots=2), "fewer than the 7 experts"),  # infeasible slots
    (np.zeros((3, 0)), dict(), "empty"),
    (np.ones(4), dict(), "2-D"),
    (-np.ones((3, 4)), dict(), "non-negative"),
    (np.full((3, 4), np.nan), dict(), "finite"),
])
def test_bad_inputs_get_clear_errors(counts, cluster_kw, match):
    with pytest.raises(InputError, match=match):
        plan_layer(make_cluster(**cluster_kw), counts)


def test_mismatched_sizes_and_options():
    c = make_cluster(per_node=3, slots=2)
    counts = np.ones((3, 4))
    other = static_layer(5, c.slots)
    with pytest.raises(InputError, match="5 experts"):
        plan_layer(c, counts, other)
    with pytest.raises(InputError, match="unknown solver"):
        plan_layer(c, counts, solver="magic")
    with pytest.raises(InputError, match="interval"):
        plan_layer(c, counts, interval=0)
    with pytest.raises(InputError, match="time budget"):
        plan_layer(c, counts, solver="ilp", time_budget=0)
    with pytest.raises(InputError, match="layers"):
        make_plan(c, np.ones((2, 3, 4)), make_plan(c, np.ones((1, 3, 4))))


def test_hierarchical_construction_keeps_a_shared_hot_expert_off_the_slow_link():
    from cost_models.routing import route
    from planner.construct import hierarchical
    # 2 nodes x 2 devices x 2 slots; expert 0 is hot and wanted equally by both nodes.
    c = make_cluster(nodes=2, per_node=2, slots=2, a=1e-5, fast=False)
    counts = np.array([[300, 40, 10, 0], [300, 40, 0, 10], [300, 0, 40, 10], [300, 10, 0, 40]])
    cands = hierarchical(c, counts)
    assert cands and all(name.startswith("nodes+") for name, _, _ in cands)
    inter = c.inter_mask
    best = None
    for _, x, share in cands:
        assert x.any(axis=1).all() and (x.sum(axis=0) <= c.slots).all()
        np.testing.assert_allclose(share.sum(axis=1), 1.0)
        assert (share[~x] == 0).all()
        # expert 0 alone: how many of its tokens cross nodes under the hierarchical routing
        only0 = np.zeros_like(counts)
        only0[:, 0] = counts[:, 0]
        crossing = route(only0, share, c.node_of)[1][inter].sum()
        best = crossing if best is None else min(best, crossing)
    assert best == pytest.approx(0.0, abs=1e-6)
    # the greedy weighs these candidates too, so it never does worse than EPLB here
    g = plan_layer(c, counts, solver="greedy")
    e = plan_layer(c, counts, solver="eplb")
    assert g.info["objective"] <= e.info["objective"] * (1 + 1e-9)


def test_spread_owners_moves_the_slow_syncs_off_a_busy_device():
    from planner.construct import spread_owners
    c = make_cluster(nodes=2, per_node=2, slots=2, a=1e-5, fast=False)  # devices 0, 1 | 2, 3
    x = np.array([[True, False, True, True], [False, True, False, False]])
    # Owner 0 would pay two inter-node syncs on the busy device 0; owner 2 leaves device 0 one
    # (as a follower) and keeps the other sync inside node 1. Expert 1 has one replica: kept.
    owner = spread_owners(c, x, np.array([1.0, 0.0, 0.0, 0.0]), np.array([0, 1]))
    assert owner.tolist() == [2, 1]


def test_balance_objective_plans_compute_alone_and_reports_the_real_step():
    c = make_cluster(nodes=2, per_node=2, slots=2, a=1e-5, fast=False)
    counts = spread([900, 300, 200, 100], 4, seed=3)
    lp = plan_layer(c, counts, solver="ilp", time_budget=1.0, objective="balance", reproducible=True)
    assert lp.info["objective_kind"] == "balance" and lp.info["gap"] < 0.02
    real = estimate(c, counts, lp.replicas(), lp.shares(), lp.owner)
    assert lp.info["step_time_s"] == pytest.approx(real.step_time)
    timed = plan_layer(c, counts, solver="ilp", time_budget=1.0, reproducible=True)
    assert timed.info["objective_kind"] == "time" and timed.info["step_time_s"] <= real.step_time * (1 + 1e-9)
    with pytest.raises(InputError, match="unknown objective"):
        plan_layer(c, counts, solver="greedy", objective="speed")


def test_make_plan_in_processes_gives_the_same_plans():
    from planner.solve import make_plan
    from tests.planner_helpers import make_cluster, spread
    cluster = make_cluster(nodes=2, per_node=2, slots=2, fast=False)
    loads = np.stack([spread(np.arange(1, 7) * (7 - k) * 10, 4, seed=k) for k in range(4)])
    one = make_plan(cluster, loads, solver="greedy")
    two = make_plan(cluster, loads, solver="greedy", processes=2)
    for a, b in zip(one.layers, two.layers):
        assert (a.assign == b.assign).all() and np.allclose(a.share, b.share) and (a.owner == b.owner).all()
        assert a.layer_id == b.layer_id

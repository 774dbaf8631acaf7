"""planner/refine.py: levelled shares, the estimator-judged local search, and the node-to-device
layout that lets slow syncs overlap."""

from __future__ import annotations

import numpy as np
import pytest

from cost_models.estimator import estimate
from planner.greedy import greedy
from planner.plan import static_layer
from planner.refine import ForkedRefines, level_shares, realise, refine
from planner.score import clean_shares, even_shares, migration_s, objective, verdict
from planner.solve import plan_layer
from tests.planner_helpers import spread
from tests.test_bounds import slow_cluster


def _case(seed):
    cluster = slow_cluster(per_node=(3, 3), slots=2)
    rng = np.random.default_rng(seed)
    load = np.sort(rng.integers(5, 400, size=6))[::-1]
    return cluster, spread(load, cluster.num_devices, seed=seed).astype(float)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("within_nodes", [False, True])
def test_refine_never_worsens_and_reports_the_estimators_objective(seed, within_nodes):
    cluster, counts = _case(seed)
    cur = static_layer(counts.shape[1], cluster.slots)
    x, s, o, _ = greedy(cluster, counts, cur, interval=5)
    start = objective(cluster, counts, x, clean_shares(x, s), o, cur, 5)
    rx, v, evals = refine(cluster, counts, cur, 5, x, s, o, within_nodes=within_nodes)
    assert evals > 0 and v.objective <= start + 1e-15
    assert v.objective == pytest.approx(objective(cluster, counts, rx, v.share, v.owner, cur, 5), rel=1e-12)
    assert (rx.sum(axis=0) <= cluster.slots).all() and rx[np.arange(len(v.owner)), v.owner].all()
    assert np.allclose(v.share.sum(axis=1), 1) and (v.share[~rx] == 0).all()


def test_refine_moves_owners_off_a_device_that_syncs_everything():
    """Every multi-node expert owned by device 0: it receives all the slow syncs. Handing some
    ownership to a replica elsewhere is an improvement the search must find."""
    cluster = slow_cluster(per_node=(2, 2), slots=2)
    counts = spread([200, 200, 200, 200], cluster.num_devices, seed=0).astype(float)
    x = np.array([[1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1]], bool)
    owner = np.array([0, 0, 1, 1])
    before = estimate(cluster, counts, x, even_shares(x), owner)
    rx, v, _ = refine(cluster, counts, None, 5, x, even_shares(x), owner)
    assert v.objective < before.step_time * (1 - 1e-3)
    assert v.estimate.sync.max() < before.sync.max()


def test_levelled_shares_even_out_the_devices_step():
    """One device pays a slow sync; levelling moves its shares of a replicated expert to the
    others, so the slowest device's step drops and the spread of device times narrows."""
    cluster = slow_cluster(per_node=(2, 2), slots=2)
    counts = spread([400, 100, 100, 50], cluster.num_devices, seed=2).astype(float)
    x = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]], bool)
    owner = np.array([0, 0, 1, 2])
    even = estimate(cluster, counts, x, even_shares(x), owner)
    share, est = level_shares(cluster, counts, x, owner, even_shares(x), rounds=3)
    assert est.step_time < even.step_time
    assert np.ptp(est.total) < np.ptp(even.total)
    assert est.step_time == pytest.approx(estimate(cluster, counts, x, share, owner).step_time, rel=1e-12)


def test_realise_pairs_the_slow_syncs_of_experts_owned_on_both_sides():
    """Expert 0 is owned on node 0 with a follower on node 1, expert 1 the other way round: each
    owner's device hosts the other expert's follower, so two devices pay one slow sync each
    (send one, receive one, overlapped) instead of four devices paying one."""
    cluster = slow_cluster(per_node=(2, 2), slots=2)
    counts = spread([100, 100, 50, 50], cluster.num_devices, seed=0).astype(float)
    replicas = np.array([[1, 1], [1, 1], [1, 0], [0, 1]])
    owner_node = np.array([0, 1, 0, 1])
    tokens = np.array([[50, 50], [50, 50], [50, 0], [0, 50]], float)
    x, share, owner = realise(cluster, counts, replicas, owner_node, tokens)
    assert (np.stack([x[:, d].sum(axis=1) for d in cluster.node_devices], axis=1) == replicas).all()
    assert cluster.node_index[owner].tolist() == owner_node.tolist() and x[np.arange(4), owner].all()
    for e, f in ((0, 1), (1, 0)):  # the owner of e hosts f's follower
        assert x[f, owner[e]] and owner[f] != owner[e]
    sync = estimate(cluster, counts, x, share, owner).sync
    assert (sync > 0).sum() == 2


def test_realise_refuses_a_node_structure_that_does_not_fit():
    cluster = slow_cluster(per_node=(2, 2), slots=2)
    counts = spread([100, 100, 50, 50, 20], cluster.num_devices, seed=0).astype(float)
    replicas = np.array([[2, 0], [1, 0], [1, 0], [1, 1], [0, 1]])  # 5 replicas on node 0's 4 slots
    assert realise(cluster, counts, replicas, np.zeros(5, int), replicas * 10.0) is None
    replicas = np.array([[3, 0], [0, 1], [0, 1], [0, 1], [0, 1]])  # 3 replicas of one expert on 2 devices
    assert realise(cluster, counts, replicas, np.zeros(5, int), replicas * 10.0) is None


def _shared_hot(seed=0):
    """Two nodes of three devices whose sources all want the hot experts (one sync's worth of
    tokens is 17 on this cluster)."""
    cluster = slow_cluster(per_node=(3, 3), slots=2)
    return cluster, spread([900, 500, 300, 120, 60, 30, 10], cluster.num_devices, seed=seed).astype(float)


def test_demand_split_serves_each_node_its_own_demand_of_the_hot_experts():
    from planner.construct import demand_split
    cluster, counts = _shared_hot()
    demand = counts.T @ cluster.node_onehot
    n, owner_node, tokens = demand_split(cluster, counts, 1.0)
    split = (n > 0).sum(axis=1) > 1
    assert split[:3].all()  # hundreds of tokens each side: worth a sync
    np.testing.assert_allclose(tokens[split], demand[split])  # each node serves its own sources
    light = demand.min(axis=1) < 17
    assert not split[light].any()  # less than a sync's worth on one side: one home
    # owners on both nodes, so a realised device can pair an owner's receipts with a follower's sends
    assert len(set(owner_node[split].tolist())) == 2
    n_none, *_ = demand_split(cluster, counts, 1e9)
    assert ((n_none > 0).sum(axis=1) == 1).all()


@pytest.mark.parametrize("seed", range(3))
def test_split_plans_are_valid_and_the_ilp_is_hinted_with_them(seed):
    from planner.ilp import hints
    from planner.refine import split_plans
    cluster, counts = _shared_hot(seed)
    cur = static_layer(counts.shape[1], cluster.slots)
    plans = split_plans(cluster, counts)
    assert plans and len({x.tobytes() + o.tobytes() for _, x, _, o in plans}) == len(plans)
    for name, x, share, owner in plans:
        assert name.startswith("split") and (x.sum(axis=0) <= cluster.slots).all(), name
        assert x[np.arange(len(owner)), owner].all() and np.allclose(share.sum(axis=1), 1) and (share[~x] == 0).all()
        assert (x @ cluster.node_onehot > 0).sum(axis=1).max() == 2  # some expert served on both nodes
    ranked, _ = hints(cluster, counts, cur, 5)
    got = {c[0]: obj for c, obj in ranked if c[0].startswith("split")}
    assert set(got) == {name for name, *_ in plans}
    for name, x, share, owner in plans:
        assert got[name] == pytest.approx(objective(cluster, counts, x, share, owner, cur, 5), rel=1e-12)


def test_split_plans_level_their_shares_against_communication():
    """Built, a node plan's shares level compute alone; the levelled ones count what each device
    sends, receives and syncs, and on a cluster with slow links they make a faster step."""
    from planner.construct import demand_split, from_nodes
    from planner.refine import split_plans
    from cost_models.presets import preset
    cluster = preset("dgx-a100-2x8", slots=3)
    load = (40000 * 0.6 ** np.arange(24)).astype(int) + 50
    counts = spread(load, cluster.num_devices, seed=3).astype(float)
    n, owner_node, tokens = demand_split(cluster, counts, 0.25)
    x, share, owner = from_nodes(cluster, counts, tokens, owner_node)
    raw = estimate(cluster, counts, x, share, owner).step_time
    levelled = dict((name, (px, ps, po)) for name, px, ps, po in split_plans(cluster, counts, units=(0.25,)))
    lx, ls, lo = levelled["split0.25/nodes"]
    assert (lx == x).all() and (lo == owner).all()
    assert estimate(cluster, counts, lx, ls, lo).step_time < 0.97 * raw


def test_refine_with_an_evaluation_limit_is_reproducible():
    cluster, counts = _case(7)
    cur = static_layer(counts.shape[1], cluster.slots)
    x, s, o, _ = greedy(cluster, counts, cur, interval=5)
    a = refine(cluster, counts, cur, 5, x, s, o, max_evals=15)
    b = refine(cluster, counts, cur, 5, x, s, o, max_evals=15)
    assert a[2] == b[2] <= 15 and (a[0] == b[0]).all() and np.array_equal(a[1].share, b[1].share)


@pytest.mark.parametrize("seed", range(3))
def test_a_move_must_pay_for_its_migration(seed):
    """Re-planning every step (interval 1), each moved replica or owner costs its whole transfer:
    the search may not trade a slightly faster step for a dearer migration."""
    cluster, counts = _case(seed)
    lp = plan_layer(cluster, counts, static_layer(counts.shape[1], cluster.slots), solver="greedy", interval=1)
    x, s, o = lp.replicas(), lp.shares(), lp.owner
    rx, v, _ = refine(cluster, counts, lp, 1, x, s, o)
    start = level_shares(cluster, counts, x, o, s, rounds=3)[1].step_time  # nothing migrates at the start
    assert v.objective <= start + 1e-15


def _verdict_of(cluster, counts, cur, x, s, o):
    return verdict(cluster, counts, x, clean_shares(x, s), o, cur, 5)


def test_forked_refines_hand_back_a_better_start_and_clean_up():
    """A start refined in a forked process beats this process's worse plan: `best` takes the
    child's (index 1), as good as that start levelled at least, and no child outlives the block."""
    import multiprocessing as mp
    import time
    cluster, counts = _case(3)
    cur = static_layer(counts.shape[1], cluster.slots)
    gx, gs, go, _ = greedy(cluster, counts, cur, interval=5)
    bad = (cur.replicas(), cur.shares(), cur.owner)
    mine = _verdict_of(cluster, counts, cur, *bad)
    good = level_shares(cluster, counts, gx, go, clean_shares(gx, gs), 3)[1].step_time
    assert good < mine.objective  # the test needs the child's start to be the better one
    with ForkedRefines(cluster, counts, cur, 5, [(gx, gs, go)], time.perf_counter() + 1.0) as forked:
        assert len(forked.children) == 1
        x, v, won = forked.best(bad[0], mine)
        procs = [p for p, _ in forked.children]
    assert won == 1 and v.objective <= good + 1e-15 + migration_s(cluster, cur, x, v.owner, 5)
    assert v.objective < mine.objective and (x.sum(axis=0) <= cluster.slots).all()
    assert not any(p.is_alive() for p in procs) and not mp.active_children()


def test_a_forked_start_that_fails_is_dropped():
    """A child whose start is malformed dies without sending: this process's plan stands."""
    import time
    cluster, counts = _case(4)
    cur = static_layer(counts.shape[1], cluster.slots)
    x, s, o, _ = greedy(cluster, counts, cur, interval=5)
    mine = _verdict_of(cluster, counts, cur, x, s, o)
    broken = (x[:, :1], s[:, :1], o)
    with ForkedRefines(cluster, counts, cur, 5, [broken], time.perf_counter() + 0.5) as forked:
        rx, v, won = forked.best(x, mine)
    assert won == 0 and rx is x and v is mine


def test_the_ilp_refines_a_runner_up_hint_on_a_spare_worker():
    """With two workers a second start is refined meanwhile (said in `info`); reproducible mode,
    whose plans must not depend on the machine, never forks."""
    from tests.planner_helpers import make_cluster, spread as spread_
    c = make_cluster(nodes=2, per_node=3, slots=2, a=1e-5, fast=False)
    counts = spread_([900, 50, 300, 10, 10, 700, 40, 5], 6, seed=2)
    two = plan_layer(c, counts, solver="ilp", time_budget=0.6, workers=2)
    assert two.info["refine_starts"] == 2
    assert two.info["objective"] <= two.info["hint_objective"] * (1 + 1e-9)
    one = plan_layer(c, counts, solver="ilp", time_budget=0.6, workers=2, reproducible=True)
    assert one.info["refine_starts"] == 1 and "refine_start" not in one.info


def test_no_fork_from_a_process_running_other_threads():
    """The runtime plans in a background thread: forking then could leave a lock held in the child."""
    import threading
    import time
    cluster, counts = _case(5)
    cur = static_layer(counts.shape[1], cluster.slots)
    x, s, o, _ = greedy(cluster, counts, cur, interval=5)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with ForkedRefines(cluster, counts, cur, 5, [(x, s, o)], time.perf_counter() + 0.5) as forked:
            assert forked.children == []
    finally:
        stop.set()
        t.join()


def test_greedy_judges_split_plans_on_small_multi_node_layers(monkeypatch):
    """Where every source wants the hot experts, a plan serving each node's own demand beats every
    single-home construction; the greedy judges it (up to `SPLIT_CELLS`) and takes it."""
    import planner.greedy as greedy_mod
    cluster, counts = _shared_hot(1)
    cur = static_layer(counts.shape[1], cluster.slots)
    x, s, o, info = greedy(cluster, counts, cur, interval=5)
    assert info["picked"].startswith("split")
    monkeypatch.setattr(greedy_mod, "SPLIT_CELLS", 0)
    x0, s0, o0, info0 = greedy(cluster, counts, cur, interval=5)
    assert not any(k.startswith("split") for k in info0["candidates"])
    assert objective(cluster, counts, x, s, o, cur, 5) < 0.99 * objective(cluster, counts, x0, s0, o0, cur, 5)

"""The replay simulator: hand-computed results on tiny traces, and that no policy sees the future."""

import numpy as np
import pytest

from cost_models.cluster import INTRA, Cluster, ComputeModel, Device, ExpertShape, Link
from cost_models.files import InputError
from cost_models.presets import local_cpu
from experiments.replay import Policy, replay, trace_stride
from experiments.traces import synth
from planner.plan import LayerPlan, static_layer
from planner.trace import Trace

B = 1e-3  # seconds per token


def toy_cluster(beta: float = 1e30, slots: int = 2) -> Cluster:
    """Two devices on one node, compute b*tokens, and (by default) free communication: step
    times are then just the busiest device's tokens times b, computable by hand."""
    dev = tuple(Device(i, 0, "toy", 2**30, slots, ComputeModel(0.0, B)) for i in range(2))
    return Cluster("toy", dev, ExpertShape(1, 1, "fp32"), {INTRA: Link(0.0, beta)})


def replicate_all(cluster, counts, current, *, solver, layer_id=0, **kw):
    """A toy policy: every expert on every device, half the tokens each (balance 1 by construction)."""
    e = np.asarray(counts).shape[1]
    x = np.ones((e, 2), bool)
    return LayerPlan.from_matrices(x, np.full((e, 2), 0.5), current.owner, 2, layer_id, {"solver": solver})


def last(history, predictor, **kw):
    return history[-1].astype(float)


# Expert totals per step: 60/20, 20/60, 40/40 (2 sources x 2 experts).
COUNTS = np.array([[[[30, 10], [30, 10]]], [[[10, 30], [10, 30]]], [[[20, 20], [20, 20]]]])


def test_static_by_hand():
    r = replay(Trace(COUNTS), toy_cluster(), Policy("static", "static"))
    # Static EP: expert 0 on device 0, expert 1 on device 1; the hotter expert sets the pace.
    assert r.step_time == pytest.approx([60 * B, 60 * B, 40 * B], abs=1e-9)
    assert r.balance[:, 0] == pytest.approx([1.5, 1.5, 1.0])
    assert r.replans == [] and r.migration_bytes.sum() == 0 and r.dropped.sum() == 0


def test_replan_migration_and_layers_by_hand():
    counts = np.concatenate([COUNTS, COUNTS[:, :, :, ::-1]], axis=1)  # a second layer, mirrored
    trace = Trace(counts)
    r = replay(trace, toy_cluster(), Policy("toy", "greedy", interval=2), plan_fn=replicate_all, predict_fn=last,
               stride=1)
    # Steps 0-1 static (nothing known before step 0), re-plan at step 2: every device holds both
    # experts and serves half of all 80 tokens per layer.
    assert r.layer_time[:, 0] == pytest.approx([60 * B, 60 * B, 40 * B], abs=1e-9)
    assert r.layer_time[2] == pytest.approx([40 * B, 40 * B], abs=1e-9)
    assert r.step_time == pytest.approx([120 * B, 120 * B, 80 * B], abs=1e-9)  # sum over layers
    # Two new replicas per layer, 16 bytes each (2*1*1+1+1 params in fp32).
    assert r.migration_bytes.tolist() == [0, 0, 64]
    assert [rec["step"] for rec in r.replans] == [2, 2] and r.summary()["replans"] == 1


def test_migration_charged_once_per_iteration_stride():
    # 16 B/s links: each device sends one 16-byte replica and receives one per layer -> 1 s.
    r = replay(Trace(COUNTS), toy_cluster(beta=16.0), Policy("toy", "greedy", interval=2),
               plan_fn=replicate_all, predict_fn=last, stride=4)
    assert r.migration_s.tolist() == pytest.approx([0, 0, 1.0])
    assert r.step_time - r.layer_time.sum(axis=1) == pytest.approx([0, 0, 0.25])


def test_capacity_drops_by_hand():
    r = replay(Trace(COUNTS), toy_cluster(), Policy("cap", "capacity", capacity_factor=1.0))
    # Each source may keep 1.0 * 40 / 2 = 20 tokens per expert: step 0 drops 10 per source.
    assert r.dropped.tolist() == [20, 20, 0]
    assert r.step_time == pytest.approx([40 * B, 40 * B, 40 * B], abs=1e-9)
    assert r.summary()["dropped_pct"] == pytest.approx(100 * 40 / 240)


def test_trigger_replans_on_observed_imbalance():
    r = replay(Trace(COUNTS), toy_cluster(), Policy("toy", "greedy", interval=0, trigger=1.2),
               plan_fn=replicate_all, predict_fn=last)
    # Step 0's balance (1.5) is seen after step 0, so the re-plan takes effect at step 1; then the
    # observed balance is 1.0 and nothing triggers again.
    assert [rec["step"] for rec in r.replans] == [1]
    assert r.layer_time[:, 0] == pytest.approx([60 * B, 40 * B, 40 * B], abs=1e-9)


def test_invalid_plan_keeps_current():
    def broken(cluster, counts, current, **kw):
        return LayerPlan(current.assign, current.share * 0.5, current.owner)  # shares do not sum to 1
    r = replay(Trace(COUNTS), toy_cluster(), Policy("b", "greedy", interval=1), plan_fn=broken, predict_fn=last)
    assert all(rec["error"] for rec in r.replans)
    assert r.step_time == pytest.approx([60 * B, 60 * B, 40 * B], abs=1e-9)


def test_predictor_sees_only_the_past():
    trace = synth("drift", steps=12, layers=2, sources=4, experts=6, tokens_per_source=50, seed=1)
    seen, planned = [], []

    def spy_predict(history, predictor, **kw):
        seen.append(history.copy())
        return history.mean(axis=0)

    def spy_plan(cluster, counts, current, *, solver, layer_id=0, **kw):
        planned.append(np.array(counts))
        return static_layer(counts.shape[1], cluster.slots, layer_id)

    policy = Policy("spy", "greedy", interval=3, window=2)
    replay(trace, local_cpu(slots=4), policy, plan_fn=spy_plan, predict_fn=spy_predict)
    steps = [3, 6, 9]
    assert len(seen) == len(steps)
    for t, h in zip(steps, seen):
        assert np.array_equal(h, trace.counts[t - 2:t])  # exactly the window before t, nothing later
    for i, t in enumerate(steps):
        for l in range(2):
            assert np.allclose(planned[2 * i + l], trace.counts[t - 2:t, l].mean(axis=0))


@pytest.mark.parametrize("solver", ["eplb", "shadow", "greedy"])
def test_future_perturbation_changes_no_earlier_decision(solver):
    a = synth("rotate", steps=12, sources=4, experts=8, tokens_per_source=200, period=2, seed=3)
    b_counts = a.counts.copy()
    k = 8  # a re-plan step: its decision uses steps 4..7 only
    b_counts[k:] = np.random.default_rng(0).integers(0, 400, size=b_counts[k:].shape)
    b = Trace(b_counts)
    cluster = local_cpu(slots=6, world_size=4)
    ra = replay(a, cluster, Policy(solver, solver, interval=2, predictor="ema", window=4))
    rb = replay(b, cluster, Policy(solver, solver, interval=2, predictor="ema", window=4))
    # Scores up to k-1 and every decision taken at or before step k are unchanged.
    assert np.array_equal(ra.layer_time[:k], rb.layer_time[:k])
    assert np.array_equal(ra.migration_bytes[:k + 1], rb.migration_bytes[:k + 1])
    before = [(r["step"], r["objective"]) for r in ra.replans if r["step"] <= k]
    assert before == [(r["step"], r["objective"]) for r in rb.replans if r["step"] <= k]


def test_first_plan_is_static_for_every_policy():
    trace = synth("zipf", steps=6, sources=4, experts=8, tokens_per_source=100, seed=2)
    cluster = local_cpu(slots=4, world_size=4)
    base = replay(trace, cluster, Policy("static", "static"))
    r = replay(trace, cluster, Policy("eplb", "eplb", interval=3))
    assert np.array_equal(base.layer_time[:3], r.layer_time[:3])


def test_stride_from_step_ids():
    t = Trace(COUNTS, step_ids=np.array([1, 11, 21]))
    assert trace_stride(t) == 10 and trace_stride(Trace(COUNTS)) == 1


@pytest.mark.parametrize("kw, message", [
    (dict(solver="magic"), "unknown policy"), (dict(solver="greedy", predictor="oracle"), "unknown predictor"),
    (dict(solver="greedy", window=0), "window"), (dict(solver="greedy", trigger=0.5), "trigger"),
    (dict(solver="capacity", capacity_factor=0.0), "capacity factor"), (dict(solver="greedy", interval=-1), "interval"),
])
def test_bad_policy(kw, message):
    with pytest.raises(InputError, match=message):
        replay(Trace(COUNTS), toy_cluster(), Policy("p", **kw))


def test_cluster_too_small():
    counts = np.ones((2, 1, 2, 5), dtype=np.int64)  # 5 experts, 4 slots
    with pytest.raises(InputError, match="fewer than the 5 experts"):
        replay(Trace(counts), toy_cluster(), Policy("static", "static"))


def stale_uneven(cluster, counts, current, *, solver, layer_id=0, **kw):
    """Both experts on both devices, with shares fitted to loads that have since flipped."""
    x = np.ones((2, 2), bool)
    share = np.array([[0.9, 0.1], [0.1, 0.9]])
    return LayerPlan.from_matrices(x, share, current.owner, 2, layer_id, {"solver": solver})


def test_adaptive_dispatch_rebalances_stale_shares_by_hand():
    # Step 1 plans (from step 0); step 2 dispatches 40/40 tokens per expert. Plan shares put
    # 0.9*40 + 0.1*40 = 40 on each device: balanced. Step 1's own loads 20/60: plan shares give
    # device 0: 0.9*20 + 0.1*60 = 24, device 1: 56; per-step shares give 40 and 40.
    counts = np.array([[[[30, 10], [30, 10]]], [[[10, 30], [10, 30]]], [[[10, 30], [10, 30]]]])
    kw = dict(plan_fn=stale_uneven, predict_fn=last)
    plan = replay(Trace(counts), toy_cluster(), Policy("p", "greedy", interval=1, dispatch="plan"), **kw)
    adaptive = replay(Trace(counts), toy_cluster(), Policy("a", "greedy", interval=1, dispatch="adaptive"), **kw)
    assert plan.layer_time[1, 0] == pytest.approx(56 * B)
    assert adaptive.layer_time[1, 0] == pytest.approx(40 * B)
    assert adaptive.balance[1, 0] == pytest.approx(1.0)
    assert adaptive.layer_time[0, 0] == plan.layer_time[0, 0]  # static placement: nothing to choose


def test_lplb_is_eplb_placement_with_per_step_shares():
    seen = []

    def record(cluster, counts, current, *, solver, layer_id=0, **kw):
        seen.append(solver)
        return stale_uneven(cluster, counts, current, solver=solver, layer_id=layer_id)

    r = replay(Trace(COUNTS), toy_cluster(), Policy("lplb", "lplb", interval=1), plan_fn=record, predict_fn=last)
    assert seen and set(seen) == {"eplb"}
    assert r.policy.dispatch == "adaptive" and r.balance[1:].max() == pytest.approx(1.0)

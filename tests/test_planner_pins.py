"""The planners' own linearisations, pinned to the estimator (and so to the one routing rule).

Greedy scores moves with an incremental proxy: compute and the all-to-all (routed by the
dispatcher's node-first rule under even shares) must equal the estimator's; its replica-sync term
adds a device's sends and receives where the estimator takes the larger, so it may only
overestimate. The ILP's model objective for the plan it returns must stay within a stated
tolerance of the estimator's objective for that plan.
"""

from dataclasses import replace

import numpy as np
import pytest

from cost_models.cluster import Link
from cost_models.estimator import estimate, fold_sources
from cost_models.presets import preset
from experiments.traces import synth
from planner.greedy import _State
import planner.ilp as ilp_mod
from planner.ilp import ilp
from planner.score import even_shares, objective
from planner.solve import plan_layer

SOLVERS = ("static", "greedy", "eplb", "shadow")
ILP_TOLERANCE = 0.10  # measured: 1% to 6% above the estimator on zipf loads, 32 experts x 16 GPUs


def instances(kind, seed):
    trace = synth(kind, steps=2, layers=2, sources=16, experts=32, seed=seed)
    return [fold_sources(trace.counts[t, l], 16) for t in range(2) for l in range(2)]


@pytest.mark.parametrize("kind", ["zipf", "lognormal"])
def test_greedy_proxy_equals_the_estimator_for_compute_and_all_to_all(kind):
    cluster = preset("dgx-a100-2x8", slots=3)
    for counts in instances(kind, 1):
        for solver in SOLVERS:
            plan = plan_layer(cluster, counts, solver=solver)
            x, owner = plan.replicas(), plan.owner
            st = _State(cluster, counts, x, owner, x, owner, 50)
            est = estimate(cluster, counts, x, even_shares(x), owner)
            np.testing.assert_allclose(st.a * st.n + st.b * st.tok, est.compute, rtol=1e-12)
            np.testing.assert_allclose(st._a2a(st.a2a_parts), est.a2a, rtol=1e-9)
            assert (st.sync >= est.sync - 1e-12).all()  # sends plus receives >= the larger of them
            assert st.times().max() >= est.step_time - 1e-12


def test_greedy_proxy_with_per_pair_links_stays_close():
    # A per-pair override that the proxy's two link classes do not see: one slow NVLink pair.
    base = preset("dgx-a100-2x8", slots=3)
    slow = Link(base.links["intra"].alpha, base.links["intra"].beta / 4)
    cluster = replace(base, pairs={(0, 1): slow, (1, 0): slow})
    worst = 0.0
    for counts in instances("zipf", 3):
        plan = plan_layer(cluster, counts, solver="greedy")
        x, owner = plan.replicas(), plan.owner
        st = _State(cluster, counts, x, owner, x, owner, 50)
        est = estimate(cluster, counts, x, even_shares(x), owner)
        worst = max(worst, abs(st.times().max() / est.step_time - 1.0))
    # measured 6.9% here: the proxy gives every intra-node pair the class bandwidth
    assert 0.0 < worst < 0.10


def test_ilp_model_objective_stays_near_the_estimator(monkeypatch):
    monkeypatch.setattr(ilp_mod, "REFINE_SHARE", 0.0)  # the model's own plan, not the local search's
    cluster = preset("dgx-a100-2x8", slots=3)
    compared = 0
    for counts in instances("zipf", 2):
        x, share, owner, info = ilp(cluster, counts, None, time_budget=1.0, reproducible=True)
        if info.get("returned") != "ilp":
            continue  # the hint came back: the model's value is for another plan
        est = objective(cluster, counts, x, share, owner, None, 50)
        assert abs(info["model_objective_s"] / est - 1.0) <= ILP_TOLERANCE
        compared += 1
    assert compared >= 1

"""A solver's own verdict (`Placement.verdict`) spares `finish` an estimate, never changes its numbers."""

import numpy as np

from planner import score
from planner.solvers import SOLVERS, SolveOptions
from planner.plan import static_layer
from tests.planner_helpers import make_cluster, spread


def _case():
    c = make_cluster(nodes=2, per_node=2, slots=3, a=1e-5, fast=False)
    counts = spread([900, 50, 300, 10, 700, 40], 4, seed=2).astype(float)
    return c, counts, static_layer(6, c.slots)


def _finish(c, counts, cur, placed, known):
    return score.finish(c, counts, placed.x, placed.share, placed.owner, cur, 5, 0, placed.info, known).info


def test_greedy_hands_back_the_verdict_on_the_plan_it_returns():
    c, counts, cur = _case()
    placed = SOLVERS["greedy"](c, counts, cur, SolveOptions(interval=5))
    v = placed.verdict
    assert v is not None and np.array_equal(v.owner, placed.owner)
    assert np.array_equal(v.share, score.clean_shares(placed.x, placed.share))
    assert v.objective == score.objective(c, counts, placed.x, v.share, v.owner, cur, 5)
    with_v, without = _finish(c, counts, cur, placed, v), _finish(c, counts, cur, placed, None)
    for key in ("objective", "step_time_s", "migration_s", "balance", "gap"):
        assert with_v[key] == without[key], key


def test_finish_ignores_a_verdict_on_other_shares_or_owners():
    c, counts, cur = _case()
    placed = SOLVERS["greedy"](c, counts, cur, SolveOptions(interval=5))
    v = placed.verdict
    right = _finish(c, counts, cur, placed, None)["objective"]
    wrong_est = score.estimate(c, counts, placed.x, score.even_shares(placed.x), None)  # no sync: cheaper
    stale = [v._replace(share=score.even_shares(placed.x) * 0.5, estimate=wrong_est),
             v._replace(owner=(v.owner + 1) % c.num_devices, estimate=wrong_est, migration_s=0.0)]
    for bad in stale:
        assert _finish(c, counts, cur, placed, bad)["objective"] == right

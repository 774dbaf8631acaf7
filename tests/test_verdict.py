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
    assert placed.share is v.share  # the verdict's own cleaned shares: finish need not clean them again
    assert np.allclose(v.share.sum(axis=1), 1.0) and not v.share[~placed.x].any()
    assert v.objective == score.objective(c, counts, placed.x, v.share, v.owner, cur, 5)
    # the judge ranks by step plus migration (its floors add migration apart: they must agree)
    assert v.migration_s > 0 and v.objective == v.estimate.step_time + v.migration_s
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


def _random_candidates(c, num_exp, rng, n=6):
    cands = []
    for k in range(n):
        x = rng.random((num_exp, c.num_devices)) < 0.3
        x[np.arange(num_exp), rng.integers(0, c.num_devices, num_exp)] = True
        share = score.clean_shares(x, rng.random(x.shape) + 0.05)  # as solvers hand them: summing to 1
        owner = np.array([rng.choice(np.flatnonzero(r)) for r in x])
        cands.append((f"c{k}", x, share, owner))
    return cands


def _slow_pairs(c):
    from dataclasses import replace
    slow = replace(c.links["intra"], beta=c.links["intra"].beta / 5)
    return replace(c, pairs={(0, 1): slow, (1, 0): slow, (2, 4): slow})


def _loads(seed, trials):
    """(cluster, whether its floors are exact, rng, loads): one bandwidth per link class, then slow pairs."""
    rng = np.random.default_rng(seed)
    base = make_cluster(nodes=2, per_node=3, slots=4, a=1e-5, fast=False)
    for cluster, exact in ((base, True), (_slow_pairs(base), False)):
        yield cluster, exact, rng, [spread(rng.integers(0, 2000, 7), 6, seed=t).astype(float) for t in range(trials)]


def test_device_floors_bound_the_estimate_and_equal_it_with_one_bandwidth_per_class():
    for cluster, exact, rng, loads in _loads(4, 30):
        gaps = []
        for counts in loads:
            for _, x, share, owner in _random_candidates(cluster, 7, rng, 2):
                share = score.clean_shares(x, share)
                est = score.estimate(cluster, counts, x, share, owner)
                floor = float((score.device_floors(cluster, counts, x, share) + est.sync).max())
                assert floor <= est.step_time * (1 + 1e-12)
                gaps.append(est.step_time / floor - 1)
        # the slow pairs make some floors loose, never invalid
        assert (max(gaps) < 1e-12) == exact


def test_judge_picks_what_estimating_every_candidate_picks_and_estimates_the_winner_alone():
    from planner.greedy import judge
    for cluster, exact, rng, loads in _loads(9, 25):
        estimated = []
        cur = static_layer(7, cluster.slots)
        for counts in loads:
            cands = _random_candidates(cluster, 7, rng)
            objs = [score.objective(cluster, counts, x, score.clean_shares(x, s), o, cur, 5) for _, x, s, o in cands]
            i, seen, v = judge(cluster, counts, cands, cur, 5)
            assert i == int(np.argmin(objs)) and v.objective == objs[i]
            assert all(seen[n] in (None, objs[k]) for k, (n, *_) in enumerate(cands))
            estimated.append(sum(o is not None for o in seen.values()))
        if exact:  # floors equal to the objective: only the winner is estimated
            assert estimated == [1] * len(estimated)
        else:
            assert max(estimated) < 6


def test_levelled_shares_are_judged_only_up_to_shares_cells(monkeypatch):
    from planner import greedy
    assert greedy.SHARES_CELLS >= 81 * 64  # the largest shape where it won on the guard instances
    c, counts, cur = _case()  # 6 experts x 4 devices: 24 cells
    for cells, judged in ((24, True), (23, False)):
        monkeypatch.setattr(greedy, "SHARES_CELLS", cells)
        info = greedy.greedy(c, counts, cur)[3]
        assert ("greedy+shares" in info["candidates"]) == judged

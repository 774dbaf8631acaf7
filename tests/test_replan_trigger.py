"""The re-plan trigger (runtime/replan.py): a plan starts every `interval` steps, or early (after a
quarter of the interval) when the smoothed counts' balance exceeds the threshold. Driven through
`Replanner.after_step` and `state()` on rank 0 of a world of one; no process group is needed."""

import numpy as np

from planner.plan import Plan, static_layer
from runtime.replan import Replanner
from tests.planner_helpers import make_cluster

E, SLOTS = 4, np.array([2, 2])
PLAN = Plan(E, SLOTS, [static_layer(E, SLOTS)])  # experts 0, 1 on device 0; 2, 3 on device 1


def replanner(policy="dynamic", interval=8, threshold=1.1):
    return Replanner(policy, rank=0, world=1, num_experts=E, slots=SLOTS, layers=1,
                     cluster=make_cluster(per_node=2, slots=2), interval=interval, threshold=threshold)


def counts(device0, device1):
    """smoothed[layer, source, expert] putting `device0` tokens on device 0's experts, `device1` on 1's."""
    return np.array([[[device0 / 2, device0 / 2, device1 / 2, device1 / 2]] * 2], dtype=float) / 2


def triggered_at(r, steps, smoothed):
    """The step counts after which `after_step` started a plan (0: none)."""
    for step in steps:
        r.after_step(step, smoothed, PLAN)
    return r.state()["last_trigger"]  # waits for a started plan


def test_imbalance_above_the_threshold_starts_a_plan_after_a_quarter_interval():
    # balance = 1.5 (max over mean tokens per device) > 1.1; step 0 is too early (1 < 8 // 4)
    r = replanner()
    assert triggered_at(r, [0], counts(300, 100)) == 0
    assert triggered_at(r, [1], counts(300, 100)) == 2
    r.close()


def test_balanced_counts_wait_for_the_interval():
    r = replanner()
    assert triggered_at(r, range(6), counts(200, 200)) == 0
    assert triggered_at(r, [6, 7], counts(200, 200)) == 8  # the interval itself
    r.close()


def test_balance_equal_to_the_threshold_does_not_trigger_early():
    r = replanner(threshold=1.5)
    assert triggered_at(r, range(4), counts(300, 100)) == 0  # exactly 1.5: not above
    r2 = replanner(threshold=1.49)
    assert triggered_at(r2, range(4), counts(300, 100)) == 2
    r.close(), r2.close()


def test_the_static_policy_never_triggers_and_the_random_one_only_on_the_interval():
    assert triggered_at(replanner("static"), range(20), counts(400, 0)) == 0
    r = replanner("random")
    assert triggered_at(r, range(7), counts(400, 0)) == 0
    assert triggered_at(r, [7], counts(400, 0)) == 8
    r.close()

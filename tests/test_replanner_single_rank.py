"""The re-planner (runtime/replan.py) on rank 0 of a world of one, through its public methods; no
process group is needed. The trigger: a plan starts every `interval` steps, or early (after a
quarter of the interval) when the smoothed counts' balance exceeds the threshold. The broadcast:
a finished plan is validated before it is handed out."""

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


def _swapped():
    """PLAN with experts 1 and 2 swapped between the devices: a valid, different placement."""
    lp = static_layer(E, SLOTS)
    lp.assign[0, 1], lp.assign[1, 0] = 2, 1
    lp.owner[1], lp.owner[2] = 1, 0
    return Plan(E, SLOTS, [lp])


def test_a_finished_plan_is_handed_out_once_and_a_corrupt_one_is_rejected():
    r = replanner()
    r.restore({"last_trigger": 0, "seq": 0, "pending": _swapped()})  # as if the planner had finished
    got = r.poll(3, PLAN)
    assert got is not None and got.seq == 1 and got.commit_step == 3
    assert np.array_equal(got.plan.layers[0].assign, _swapped().layers[0].assign)
    assert r.poll(4, PLAN) is None  # nothing new
    corrupt = _swapped()
    corrupt.layers[0].owner[0] = 9  # an owner outside the cluster: the broadcast carries it as it is
    bad = replanner()
    bad.restore({"last_trigger": 0, "seq": 0, "pending": corrupt})
    assert bad.poll(3, PLAN) is None
    assert bad.stats["rejected"] == 1 and bad.stats["plans"] == 1

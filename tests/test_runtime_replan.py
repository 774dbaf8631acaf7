"""Background planner failures: counted, in the metrics and on the progress line, a warning after
`PLANNER_FAILURE_LIMIT` in a row, training goes on; a refused input is told apart from a bug. One
rank, in process; the failing planner is injected through `runtime.faults`, not by patching."""

import inspect
import json
import logging

import numpy as np
import pytest

from cost_models.files import InputError
from cost_models.presets import local_cpu
from planner.plan import Plan, static_layer
from runtime.defaults import PLANNER_FAILURE_LIMIT, REPLAN_THRESHOLD
from runtime.faults import Faults
from runtime.layer import FlexMoERuntime
from runtime.model import ModelConfig
from runtime.replan import Replanner
from runtime.trainer import TrainConfig, train

TINY = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, top_k=1, seq_len=8)


def test_planner_failures_reach_metrics_and_progress_and_warn_once_per_run_of_failures(tmp_path, caplog, capsys):
    assert PLANNER_FAILURE_LIMIT == 3  # the attempts below are laid out for it
    out = tmp_path / "m.jsonl"
    # Attempt k is triggered after step k - 1 and harvested at step k (reproducible: it is waited for).
    # Attempts 1, 2 fail, 3 succeeds (the run of failures restarts), 4 to 7 fail: one warning, at step 6.
    cfg = TrainConfig(TINY, steps=8, batch=1, policy="random", interval=1, reproducible=True, progress=False,
                      metrics_out=str(out), faults=Faults(fail_plans={1, 2, 4, 5, 6, 7}))
    with caplog.at_level(logging.INFO, logger="flexmoe"):
        r = train(0, 1, cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["planner_failures"] for x in rows] == [0, 1, 2, 2, 3, 4, 5, 6]
    assert r["planner_failures"] == [0, 1, 2, 2, 3, 4, 5, 6] and r["stats"]["planner_failures"] == 6
    assert len(r["losses"]) == 8  # training went on
    messages = [rec.getMessage() for rec in caplog.records]
    warnings = [i for i, rec in enumerate(caplog.records) if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 times in a row" in messages[warnings[0]], messages
    before = [m for m in messages[:warnings[0]] if m.startswith("step ")]
    after = [m for m in messages[warnings[0]:] if m.startswith("step ")]
    assert before[-1].startswith("step 6/8") and after[0].startswith("step 7/8"), messages  # progress lines
    assert after[0].endswith(", 5 planner failures") and before[2].endswith(", 2 planner failures")
    assert before[0].endswith("balance 1.00")  # no failure yet: nothing said
    assert sum(m.startswith("re-planning failed (planner error RuntimeError: injected") for m in messages) == 6
    assert capsys.readouterr().out.strip().endswith(", 6 planner failures")  # the batch job's summary line


class _Refusing(Replanner):
    """A planner that fails with the given exception (a test double, not a patch)."""

    def __init__(self, exc, **kw):
        super().__init__("dynamic", **kw)
        self.exc = exc

    def _solve(self, loads, current, seq):
        raise self.exc


@pytest.mark.parametrize("exc, said", [(InputError("loads hold no layer"), "the planner refused its input: "),
                                       (ZeroDivisionError("division by zero"), "planner error ZeroDivisionError: ")])
def test_a_refused_input_is_told_apart_from_a_planner_bug(exc, said):
    slots = np.array([4])
    plan = Plan(4, slots, [static_layer(4, slots)])
    lines = []
    r = _Refusing(exc, rank=0, world=1, num_experts=4, slots=slots, layers=1, cluster=local_cpu(4, world_size=1),
                  interval=1, wait=True, log=lines.append, failure_limit=2)
    for step in range(3):
        assert r.poll(step, plan) is None
        r.after_step(step, np.ones((1, 1, 4)), plan)
    r.close()
    assert r.stats["planner_failures"] == 3 and r.failures_in_row == 3
    assert lines == [f"re-planning failed ({said}{exc}); placement unchanged"] * 3


def test_the_replan_threshold_has_one_default():
    from flexmoe.commands.train import train_cmd
    defaults = [TrainConfig().threshold, inspect.signature(FlexMoERuntime).parameters["threshold"].default,
                inspect.signature(Replanner).parameters["threshold"].default,
                inspect.signature(train_cmd).parameters["threshold"].default]
    assert defaults == [REPLAN_THRESHOLD] * 4

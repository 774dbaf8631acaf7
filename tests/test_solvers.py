"""The solver registry: each name runs the solver it names, and every entry point accepts exactly its names."""

import re

import pytest

from cost_models.files import InputError
from flexmoe.cli import main
from planner.solve import plan_layer
from planner.solvers import SOLVERS, Placement, SolveOptions, check_solver
from tests.planner_helpers import make_cluster, spread


@pytest.mark.parametrize("name", list(SOLVERS))
def test_each_registered_name_runs_the_solver_it_names(name):
    c = make_cluster(nodes=2, per_node=2, slots=3, a=1e-5, fast=False)
    counts = spread([900, 50, 300, 10, 700, 40], 4, seed=2)
    options = SolveOptions(time_budget=0.5, reproducible=True)
    placed = SOLVERS[name](c, counts.astype(float), None, options)
    assert isinstance(placed, Placement) and placed.x.shape == placed.share.shape == (6, 4)
    assert placed.info["solver"] == name
    assert plan_layer(c, counts, solver=name, time_budget=0.5, reproducible=True).info["solver"] == name


@pytest.mark.parametrize("name", ["magic", "", ["greedy"], None])
def test_check_solver_rejects_other_names_in_one_line_listing_the_registry(name):
    with pytest.raises(InputError) as err:
        check_solver(name)
    assert "\n" not in str(err.value) and ", ".join(SOLVERS) in str(err.value)


def test_check_solver_accepts_registered_names():
    assert [check_solver(n) for n in SOLVERS] == list(SOLVERS)


@pytest.mark.parametrize("command", [["plan", "-c", "c.json", "-t", "t.npz", "-o", "p.json"], ["train"]])
def test_cli_solver_choices_are_the_registry(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--solver", "nope"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    listed = re.findall(r"'(\w+)'", err.partition("is not one of")[2])
    assert listed == list(SOLVERS)


def test_the_runtime_refuses_an_unknown_solver_before_training_starts():
    """Checked in the parent (TrainConfig.check) and by every rank's re-planner, not left to the
    background planner, whose failures only warn."""
    import numpy as np

    from runtime.replan import Replanner
    from runtime.trainer import TrainConfig
    with pytest.raises(InputError, match="unknown solver 'nope'"):
        TrainConfig(solver="nope").check(2)
    with pytest.raises(InputError, match="unknown solver 'nope'"):
        Replanner("dynamic", rank=0, world=1, num_experts=4, slots=np.array([4]), layers=1, solver="nope")
    assert TrainConfig(solver="ilp").check(2).solver == "ilp"


@pytest.mark.parametrize("reproducible,given", [(False, 0.6), (True, 1.0)])
def test_the_ilp_budget_counts_the_import_of_its_solver(monkeypatch, reproducible, given):
    """The first ILP call in a process imports OR-Tools inside the call: that time comes off the
    wall-clock budget (not off the reproducible mode's deterministic one)."""
    import sys
    import types

    from planner import solvers
    seen = {}

    def fake_ilp(cluster, counts, current, **kw):
        seen.update(kw)
        return None, None, None, {}

    monkeypatch.setitem(sys.modules, "planner.ilp", types.SimpleNamespace(ilp=fake_ilp))
    clock = iter([10.0, 10.4])  # the import took 0.4 s
    monkeypatch.setattr(solvers, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    solvers._ilp(None, None, None, SolveOptions(time_budget=1.0, reproducible=reproducible))
    assert seen["time_budget"] == pytest.approx(given)

import json

import numpy as np
import pytest

from flexmoe.cli import main
from planner.plan import Plan
from tests.planner_helpers import write_plan_inputs


@pytest.fixture
def files(tmp_path):
    return write_plan_inputs(tmp_path, steps=4)


def run(*args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code


def test_plan_writes_a_plan_and_prints_a_summary(files, capsys):
    out = files / "plan.json"
    assert run("plan", "-c", str(files / "cluster.json"), "-t", str(files / "trace.npz"), "-o", str(out),
               "--solver", "greedy", "--steps", "1:3", "--predictor", "mean", "--layers", "1") == 0
    p = Plan.load(out)
    assert len(p.layers) == 1 and p.layers[0].layer_id == 1
    text = capsys.readouterr().out
    assert "balance" in text and "moves:" in text
    out2 = files / "plan2.json"
    assert run("plan", "-c", str(files / "cluster.json"), "-t", str(files / "trace.npz"), "-o", str(out2),
               "--solver", "ilp", "--time-budget", "0.2", "--current", str(out), "--layers", "1") == 0
    assert Plan.load(out2).layers[0].info["solver"] == "ilp"


@pytest.mark.parametrize("extra, message", [
    (["--solver", "nope"], "'nope' is not one of"),
    (["--steps", "9:12"], "selects no step"),
    (["--steps", "x"], "A:B"),
    (["--layers", "5"], "--layers"),
    (["--predictor", "crystal"], "'crystal' is not one of"),
    (["--time-budget", "0"], "--time-budget"),
])
def test_bad_options_exit_2_without_a_file(files, capsys, extra, message):
    out = files / "bad.json"
    code = run("plan", "-c", str(files / "cluster.json"), "-t", str(files / "trace.npz"), "-o", str(out), *extra)
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_mismatched_current_plan_is_rejected(files, capsys):
    out = files / "plan.json"
    assert run("plan", "-c", str(files / "cluster.json"), "-t", str(files / "trace.npz"), "-o", str(out),
               "--solver", "static") == 0
    code = run("plan", "-c", str(files / "cluster.json"), "-t", str(files / "trace.npz"), "-o",
               str(files / "x.json"), "--current", str(out), "--layers", "0")
    assert code == 2 and "layers" in capsys.readouterr().err
    assert json.loads(out.read_text())["schema"] == "flexmoe.plan/1"


def test_plan_exports_eplb_mapping(files):
    from planner.eplb_mapping import load_eplb

    out, mapping = files / "plan.json", files / "mapping.npz"
    assert run("plan", "-c", str(files / "cluster.json"), "-t", str(files / "trace.npz"), "-o", str(out),
               "--solver", "eplb", "--eplb-out", str(mapping)) == 0
    plan, back = Plan.load(out), load_eplb(mapping, 4)
    for a, b in zip(plan.layers, back.layers):
        assert np.array_equal(a.assign, b.assign) and np.allclose(a.share, b.share)
    with np.load(mapping) as d:
        assert d["phy2log"].shape == (2, 12)
        assert d["logcnt"].sum(axis=1).tolist() == [int((l.assign >= 0).sum()) for l in plan.layers]


def test_plan_balance_objective_and_bad_objective(files, capsys):
    out = files / "plan.json"
    args = ["plan", "-c", str(files / "cluster.json"), "-t", str(files / "trace.npz"), "-o", str(out),
            "--time-budget", "0.2"]
    assert run(*args, "--objective", "balance") == 0
    assert Plan.load(out).layers[0].info["objective_kind"] == "balance"
    assert "compute makespan" in capsys.readouterr().out
    out.unlink()
    assert run(*args, "--objective", "speed") == 2 and not out.exists()
    assert "'speed' is not one of" in capsys.readouterr().err

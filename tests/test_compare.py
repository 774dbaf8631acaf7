"""`flexmoe compare`: the report it writes, and that bad input fails cleanly with nothing written."""

import csv
import json

import numpy as np
import pytest

from cost_models.files import InputError

from cost_models.presets import local_cpu
from experiments import compare as cmp
from experiments.replay import Policy
from experiments.traces import synth
from flexmoe.cli import main
from planner.trace import Trace



def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


@pytest.fixture
def inputs(tmp_path):
    trace = synth("rotate", steps=8, layers=2, sources=4, experts=8, tokens_per_source=256, period=2, seed=0)
    trace.save(tmp_path / "t.npz")
    local_cpu(slots=3, world_size=4).save(tmp_path / "c.json")
    return tmp_path / "t.npz", tmp_path / "c.json"


def test_compare_writes_report(inputs, tmp_path, capsys):
    t, c = inputs
    policies = "static,capacity,shadow,eplb,greedy,ilp"
    out = tmp_path / "report"
    code, text, err = run(capsys, "compare", "-c", c, "-t", t, "-o", out, "--policies", policies,
                          "--interval", 2, "--time-budget", 0.2, "--no-progress")
    assert code == 0, err
    names = policies.split(",")
    for n in names:
        assert n in text
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["policy"] for r in rows] == names
    assert float(rows[0]["speedup"]) == 1.0
    assert all(float(r["dropped_tokens"]) == 0 for r in rows if r["policy"] != "capacity")
    assert "| policy |" in (out / "report.md").read_text()
    assert "off the critical path" in (out / "report.md").read_text()
    for png in ("step_time.png", "balance.png", "speedup.png", "optimality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert len(steps) == 8 * len(names)
    replans = list(csv.DictReader((out / "replans.csv").open()))
    assert {r["step"] for r in replans} == {"2", "4", "6"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_ilp_records_greedy_reference(inputs):
    t, c = inputs
    trace = Trace.load(t).select(steps=slice(0, 4), layers=[0])
    res = cmp.run_all(trace, cmp.Cluster.load(c), cmp.make_policies(["ilp"], interval=2, time_budget=0.2))
    recs = res[1].replans
    assert recs and all(r["ref_solver"] == "greedy" and r["ref_objective"] is not None for r in recs)
    opt = cmp.optimality(res)
    assert opt["replans"] == len(recs) and opt["greedy_over_ilp_max_pct"] >= 0
    both = cmp.run_all(trace, cmp.Cluster.load(c), cmp.make_policies(["ilp"], dispatch="both", interval=2,
                                                                      time_budget=0.2))
    assert [r.policy.name for r in both] == ["static", "ilp", "ilp (plan shares)"]
    assert cmp.optimality(both)["replans"] == len(both[1].replans)  # the same re-plans, counted once


def test_excerpt_layout_is_read(tmp_path):
    counts = np.arange(2 * 1 * 2 * 3 * 4, dtype=np.uint16).reshape(2, 1, 2, 3, 4)
    np.savez(tmp_path / "x.npz", counts=counts, iters=np.array([1, 11]), layers=np.array([7]))
    t = cmp.load_trace(tmp_path / "x.npz")
    assert t.counts.shape == (2, 1, 2, 4) and t.step_ids.tolist() == [1, 11] and t.layer_ids.tolist() == [7]
    assert np.array_equal(t.counts, counts.sum(axis=3))


@pytest.mark.parametrize("which, content, message", [
    ("trace", b"not a zip", "t.npz: not a readable .npz trace"),
    ("trace", None, "t.npz: no such trace file"),
    ("cluster", b"{", "c.json: not valid JSON"),
    ("cluster", json.dumps({"schema": "flexmoe.cluster/1"}).encode(), "c.json: malformed cluster"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(inputs, tmp_path, capsys, which, content, message):
    t, c = inputs
    target = t if which == "trace" else c
    if content is None:
        target.unlink()
    else:
        target.write_bytes(content)
    out = tmp_path / "report"
    code, _, err = run(capsys, "compare", "-c", c, "-t", t, "-o", out, "--policies", "static", "--no-progress")
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_too_few_slots_names_cluster(inputs, tmp_path, capsys):
    t, c = inputs
    local_cpu(slots=1, world_size=4).save(c)  # 4 slots for 8 experts
    code, _, err = run(capsys, "compare", "-c", c, "-t", t, "-o", tmp_path / "r", "--no-progress")
    assert code == 2 and "c.json" in err and "fewer than the 8 experts" in err


def test_bad_option_is_a_clear_error(inputs, tmp_path, capsys):
    t, c = inputs
    code, _, err = run(capsys, "compare", "-c", c, "-t", t, "-o", tmp_path / "r", "--policies", "static,oracle")
    assert code == 2 and "unknown policies ['oracle']" in err and not (tmp_path / "r").exists()


def test_failed_figures_leave_no_report(inputs, tmp_path, monkeypatch):
    import experiments.figures as figs
    t, c = inputs

    def boom(*a, **k):
        raise RuntimeError("plotting failed")
    monkeypatch.setattr(figs, "render_all", boom)
    res = cmp.run_all(Trace.load(t), cmp.Cluster.load(c), [Policy("static", "static")])
    out = tmp_path / "r"
    with pytest.raises(RuntimeError):
        cmp.write_report(out, res, {"trace": "t", "cluster": "c"})
    assert not out.exists() or not list(out.iterdir())


def test_markdown_table_shape():
    rows = [{"policy": "static", "mean_step_ms": 2.0, "speedup": 1.0, "mean_balance": 2.0, "worst_balance": 3.0,
             "median_balance": 2.0, "p90_balance": 2.5, "dropped_pct": 0.0, "migration_mib": 0.0, "replans": 0, "planner_s": 0.0}]
    lines = cmp.markdown_table(rows).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| static | 2.000 | 1.00x |")


def test_selection_trigger_and_no_figures(inputs, tmp_path, capsys):
    t, c = inputs
    out = tmp_path / "r"
    code, _, err = run(capsys, "compare", "-c", c, "-t", t, "-o", out, "--policies", "eplb", "--steps", 4,
                       "--layers", "1", "--interval", 0, "--trigger", 1.05, "--no-figures", "--no-progress")
    assert code == 0, err
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert [r["policy"] for r in steps] == ["static"] * 4 + ["eplb"] * 4
    replans = list(csv.DictReader((out / "replans.csv").open()))
    assert replans and all(r["layer"] == "1" and 1 <= int(r["step"]) < 4 for r in replans)
    assert not list(out.glob("*.png"))


def test_dispatch_both_runs_each_replacing_policy_twice():
    pols = cmp.make_policies(["capacity", "eplb", "lplb", "greedy"], dispatch="both")
    got = [(p.name, p.solver, p.dispatch) for p in pols]
    assert got == [("static", "static", "plan"), ("capacity", "capacity", "plan"),
                   ("eplb", "eplb", "plan"),  # EPLB as published: its adaptive twin is lplb
                   ("lplb", "lplb", "adaptive"),
                   ("greedy", "greedy", "adaptive"), ("greedy (plan shares)", "greedy", "plan")]
    alone = cmp.make_policies(["eplb"], dispatch="both")
    assert [(p.name, p.dispatch) for p in alone] == [("static", "plan"), ("eplb", "adaptive"),
                                                     ("eplb (plan shares)", "plan")]
    assert [p.dispatch for p in cmp.make_policies(["greedy"], dispatch="plan")] == ["plan", "plan"]
    with pytest.raises(InputError, match="dispatch"):
        cmp.make_policies(["greedy"], dispatch="lp")


def test_slots_option_overrides_the_cluster_files_slots(inputs, tmp_path, capsys):
    t, c = inputs  # the cluster file has 3 slots per device: 12 for 8 experts
    code, _, err = run(capsys, "compare", "-c", c, "-t", t, "-o", tmp_path / "few", "--slots", 1,
                       "--policies", "static", "--no-progress")
    assert code == 2 and "fewer than the 8 experts" in err and not (tmp_path / "few").exists()
    local_cpu(slots=1, world_size=4).save(c)  # too few in the file, enough with --slots
    code, text, err = run(capsys, "compare", "-c", c, "-t", t, "-o", tmp_path / "r", "--slots", 4, "--steps", 2,
                          "--policies", "greedy", "--no-figures", "--no-progress")
    assert code == 0, err
    assert "slots [4] per device (16 in all)" in text

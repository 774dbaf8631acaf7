"""Offline mode: per re-plan, the best plan found, a valid bound, and every policy's distance to it;
`flexmoe compare --offline-budget` writes them to replans.csv, the report and a figure."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from cost_models.estimator import estimate
from cost_models.presets import local_cpu
from experiments import offline
from experiments.traces import synth
from planner.plan import static_layer
from tests.test_bounds import brute_min, slow_cluster
from tests.planner_helpers import spread
from tests.test_compare import run


def test_offline_instance_is_valid_and_no_worse_than_the_policies():
    cluster = slow_cluster()
    counts = spread([300, 40, 20], cluster.num_devices, seed=0)
    cur = static_layer(3, cluster.slots)
    found = offline.solve_instance(cluster, counts, cur, 5, budget=2.0, workers=1)
    obj = found["objectives"]
    assert found["offline_best_s"] == pytest.approx(min(obj.values()))
    assert found["offline_best_s"] <= obj["greedy"] and found["offline_best_s"] <= obj["eplb"]
    assert found["offline_bound_s"] <= brute_min(cluster, counts.astype(float), cur, 5) * (1 + 1e-9)
    assert found["offline_bound_s"] <= found["offline_best_s"]
    for p in ("greedy", "eplb"):
        assert found[f"offline_{p}_gap"] == pytest.approx(obj[p] / found["offline_bound_s"] - 1)
    assert found["offline_gap"] == pytest.approx(found["offline_best_s"] / found["offline_bound_s"] - 1)


def test_compare_offline_writes_gaps(tmp_path, capsys):
    trace = synth("rotate", steps=6, layers=3, sources=4, experts=8, tokens_per_source=256, period=2, seed=0)
    trace.save(tmp_path / "t.npz")
    local_cpu(slots=3, world_size=4).save(tmp_path / "c.json")
    out = tmp_path / "report"
    code, text, err = run(capsys, "compare", "-c", tmp_path / "c.json", "-t", tmp_path / "t.npz", "-o", out,
                          "--policies", "eplb,greedy,ilp", "--interval", 3, "--time-budget", 0.1,
                          "--offline-budget", 0.3, "--no-progress")
    assert code == 0, err
    assert "offline (0.3 s per instance" in text
    rows = list(csv.DictReader((out / "replans.csv").open()))
    ilp_rows = [r for r in rows if r["policy"] == "ilp"]
    assert len(ilp_rows) == 3  # one re-plan (step 3) x 3 layers
    for r in ilp_rows:
        bound, best = float(r["offline_bound_s"]), float(r["offline_best_s"])
        assert 0 < bound <= best <= float(r["objective"]) * (1 + 1e-9)
        assert float(r["offline_ilp_gap"]) == pytest.approx(float(r["objective"]) / bound - 1, rel=1e-6)
        assert float(r["offline_greedy_gap"]) >= float(r["offline_gap"]) - 1e-9
    assert all(r["offline_bound_s"] == "" for r in rows if r["policy"] != "ilp")
    report = (out / "report.md").read_text()
    assert "## Offline: distance to the proven optimum" in report and "| online ILP |" in report
    assert (out / "offline_gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_offline_needs_the_ilp_policy(tmp_path, capsys):
    trace = synth("rotate", steps=4, layers=1, sources=4, experts=8, tokens_per_source=64, period=2, seed=0)
    trace.save(tmp_path / "t.npz")
    local_cpu(slots=3, world_size=4).save(tmp_path / "c.json")
    code, _, err = run(capsys, "compare", "-c", tmp_path / "c.json", "-t", tmp_path / "t.npz", "-o",
                       tmp_path / "r", "--policies", "greedy", "--offline-budget", 1, "--no-progress")
    assert code == 2 and "add ilp" in err
    assert not (tmp_path / "r").exists()


def test_figure_is_one_box_per_policy_whatever_the_layers():
    rng = np.random.default_rng(0)
    recs = [{"offline_bound_s": 1.0, "offline_wall_s": 1.0, "offline_gap": g, "offline_greedy_gap": g + 0.1,
             "offline_eplb_gap": g + 0.2, "offline_ilp_gap": g + 0.05} for g in rng.random(61 * 4) * 0.1]
    s = offline.summary(recs)
    assert s["replans"] == 244 and s["greedy"]["median"] > s["offline"]["median"]
    assert offline.figure(recs)[:8] == b"\x89PNG\r\n\x1a\n"
    assert offline.summary([{"objective": 1.0}]) is None and offline.markdown(None, 1) == ""


def test_diagnosis_splits_plan_and_relaxation_by_the_same_terms():
    """The relaxation's incumbent is split as its node rows charge it (their sum within its T, all
    tokens computed), the plan's as the estimator does (its terms add up to the mean device time)."""
    cluster = slow_cluster()
    counts = spread([300, 40, 20], cluster.num_devices, seed=0)
    cur = static_layer(3, cluster.slots)
    d = offline.diagnose(cluster, counts, cur, 5, budget=2.0)
    plan, rel = d["plan"], d["relaxation"]
    est = estimate(cluster, counts, *d["best_plan"])
    assert sum(plan[k] for k in ("compute", "a2a", "sync", "latency")) == pytest.approx(est.total.mean())
    assert plan["step"] + plan["migration"] == pytest.approx(d["best_s"]) and plan["a2a"] > 0
    parts = sum(rel[k] for k in ("compute", "a2a", "sync", "latency"))
    assert parts <= rel["step"] * (1 + 1e-6)
    assert rel["compute"] >= cluster.compute_b.min() * counts.sum() / cluster.num_devices * (1 - 1e-6)
    assert rel["a2a"] > 0 and rel["migration"] > 0
    assert rel["step"] + rel["migration"] >= d["bound_s"] * (1 - 1e-6)
    # fixed to the plan's node structure, the node model bounds that plan and sees its tokens
    same = d["plan_structure"]
    assert d["bound_s"] * (1 - 1e-6) <= d["plan_structure_s"] <= d["best_s"] * (1 + 1e-9)
    assert same["compute"] == pytest.approx(plan["compute"], rel=1e-3) and same["a2a"] > 0


def test_every_node_incumbent_becomes_refined_device_plans():
    """The offline solve turns each node relaxation's incumbent into device plans four ways,
    scored by the estimator (what `obj` says is that plan's objective) and kept among the
    candidates; the paired and the solved layouts keep the node solution's replica counts."""
    from planner import bounds
    from planner.score import objective
    cluster = slow_cluster(per_node=(2, 2))
    counts = spread([300, 120, 60, 20], cluster.num_devices, seed=1)
    cur = static_layer(4, cluster.slots)
    sol = bounds.NodeRelaxation(cluster, counts, cur, 5).solve(5.0)[1]
    plans, obj = {}, {}
    offline._add_node_plans(cluster, counts, cur, 5, sol, "nodesX", plans, obj, lambda share: 1.0, 0.0)
    assert set(plans) == {"nodesX", "nodesX/owners", "nodesX/paired", "nodesX/layout"}
    for k, (x, s, o) in plans.items():
        assert x[np.arange(4), o].all() and np.allclose(s.sum(axis=1), 1) and (s[~x] == 0).all()
        assert obj[k] == pytest.approx(objective(cluster, counts, x, s, o, cur, 5))
    # refining moves replicas only inside a node: the paired plan has the node solution's counts
    want = sol[1].copy()
    want[np.arange(4), sol[2]] = np.maximum(want[np.arange(4), sol[2]], 1)
    for tag in ("paired", "layout"):
        x = plans[f"nodesX/{tag}"][0]
        assert (np.stack([x[:, d].sum(axis=1) for d in cluster.node_devices], axis=1) == want).all(), tag
    found = offline.solve_instance(cluster, counts, cur, 5, budget=2.0, workers=1)
    assert any(k.startswith("nodes") for k in found["objectives"])
    assert found["offline_best_s"] == pytest.approx(min(found["objectives"].values()))


def test_diagnosis_command_refuses_a_missing_trace_and_bad_arguments_in_one_line(tmp_path, monkeypatch, capsys):
    import experiments.bench_planner as bench
    monkeypatch.setattr(bench, "SMARTMOE", tmp_path / "none.npz")
    with pytest.raises(SystemExit) as err:
        offline.main(["0", "--budget", "1"])
    assert err.value.code == 2 and "no trace excerpt at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        offline.main(["0", "--budget", "0"])
    assert err.value.code == 2 and "--budget must be a positive number" in capsys.readouterr().err


def test_the_last_relaxation_stage_in_its_own_process_runs_until_its_plans_are_due():
    """Nothing follows the last stage in its lane, so it gets what is left before the ILP's share
    less the time to make its incumbent into plans, where that beats its share; inline (taking
    turns with the search) or earlier stages keep their share."""
    budget = 60.0
    due = offline.REALISE_SHARE * budget
    assert offline._stage_seconds(24.0, True, 50.0, budget) == pytest.approx(50.0 - due)
    assert offline._stage_seconds(24.0, True, 30.0, budget) == 24.0  # little left: its share stands
    assert offline._stage_seconds(24.0, False, 50.0, budget) == 24.0
    assert offline._stage_seconds(0.0, False, 0.0, budget) == 0.01  # a solver needs a positive limit

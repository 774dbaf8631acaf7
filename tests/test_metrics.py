"""`flexmoe train --metrics-out`: per-step rows that agree with the run, CSV or JSON lines by suffix,
bad paths refused before any process starts."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cost_models.files import InputError
from planner.plan import Plan
from runtime import metrics
from runtime.launch import spawn
from runtime.model import ModelConfig
from runtime.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, top_k=2, seq_len=16)


def _run(tmp, name, suffix, **kw):
    res, out = tmp / f"{name}.pt", tmp / f"{name}{suffix}"
    cfg = TrainConfig(ModelConfig(**TINY), **{"steps": 6, "batch": 2, "slots": 3, "progress": False,
                                              "result_out": str(res), "metrics_out": str(out), **kw})
    spawn(cfg, 2, timeout=120, pg_timeout=60)
    return torch.load(res, weights_only=False), out


def test_static_run_rows_match_the_result_and_the_sync_volume(tmp_path, capfd):
    from runtime.replan import random_plan
    start = tmp_path / "plan.json"
    random_plan(4, np.array([3, 3]), 2, np.random.default_rng(0)).save(start)  # spare slots hold replicas
    r, out = _run(tmp_path, "static", ".csv", policy="static", plan=str(start))
    printed = [line for line in capfd.readouterr().out.splitlines() if "re-plans committed" in line]
    assert len(printed) == 1 and printed[0].startswith("[flexmoe] 6 steps")  # stdout is not a terminal here
    rows = list(csv.DictReader(out.open()))
    assert [int(x["step"]) for x in rows] == list(range(6))
    np.testing.assert_allclose([float(x["loss"]) for x in rows], r["losses"], rtol=1e-6)
    np.testing.assert_allclose([float(x["balance"]) for x in rows], r["balances"], rtol=1e-6)
    np.testing.assert_allclose([float(x["tokens_per_s"]) * float(x["step_s"]) for x in rows], 2 * 2 * 16, rtol=1e-6)
    # Every replica that is not its expert's owner sends P gradient floats and gets P weight floats back.
    plan = Plan.from_dict(r["plan"])
    d, f = TINY["d_model"], TINY["d_ff"]
    extra = sum(int(lp.replicas().sum()) - plan.num_experts for lp in plan.layers)
    assert extra > 0
    expect = 2 * extra * (2 * d * f + d + f) * 4
    assert {int(x["sync_bytes"]) for x in rows} == {expect}
    assert all(int(x["migration_bytes"]) == 0 and x["replanned"] == "False" for x in rows)
    phases = [k for k in rows[0] if k.startswith("t_")]
    assert len(phases) == len(r["phase_names"]) and all(float(x[k]) >= 0 for x in rows for k in phases)


def test_replacements_are_counted_with_their_moved_moments(tmp_path):
    r, out = _run(tmp_path, "random", ".jsonl", policy="random", interval=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert [x["replanned"] for x in rows] == list(r["changes"])
    assert rows[-1]["replans_committed"] == r["stats"]["committed"] >= 2
    assert np.all(np.diff([x["replans_committed"] for x in rows]) >= 0)
    for x in rows:
        assert x["bytes_moved"] == x["sync_bytes"] + x["migration_bytes"]
        if not x["replanned"]:
            assert x["migration_bytes"] == 0
    # random plans move owners: at least one switch moved moments (2 vectors of P floats each)
    p = 2 * TINY["d_model"] * TINY["d_ff"] + TINY["d_model"] + TINY["d_ff"]
    moved = [x["migration_bytes"] for x in rows if x["replanned"]]
    assert any(moved) and all(m % (2 * p * 4) == 0 for m in moved)


def test_migration_floats_counts_moved_owners():
    from runtime.replan import random_plan
    a = random_plan(4, np.array([3, 3]), 2, np.random.default_rng(0))
    b = random_plan(4, np.array([3, 3]), 2, np.random.default_rng(1))
    moved = sum(int((x.owner != y.owner).sum()) for x, y in zip(a.layers, b.layers))
    assert metrics.migration_floats(a, b, 10) == 20 * moved
    assert metrics.migration_floats(a, a, 10) == 0


def test_summary_is_one_line():
    row = {"loss": 2.0, "tokens_per_s": 100.0, "balance": 1.5, "replans_committed": 3, "bytes_moved": 2**20}
    line = metrics.summary([dict(row, loss=3.0), row])
    assert "\n" not in line and "2 steps" in line and "3 re-plans" in line and "2.00 MiB" in line


def test_bad_paths_are_refused(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    for bad in (tmp_path, afile / "m.jsonl", ""):
        with pytest.raises(InputError):
            metrics.check_path(bad)
    metrics.check_path(tmp_path / "new" / "dir" / "m.csv")  # missing folders are made when writing
    with pytest.raises(InputError):
        TrainConfig(metrics_out=str(tmp_path)).check(2)


def test_cli_refuses_a_bad_metrics_path_before_training(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    p = subprocess.run([sys.executable, "-m", "flexmoe", "train", "--steps", "1", "--metrics-out", str(afile / "m.csv")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not a directory" in p.stderr and len(p.stderr.strip().splitlines()) == 1

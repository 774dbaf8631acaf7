"""Exact resume under `--policy dynamic`: the monitor's smoothed counts, the trigger and a finished
plan not yet applied are checkpointed, so 10 steps + resume 10 equal 20 straight steps bit for bit
(weights, optimizer moments and placement). Two gloo ranks on loopback."""

from dataclasses import replace

import numpy as np
import torch

from cost_models.cluster import ComputeModel
from cost_models.presets import local_cpu
from runtime.launch import spawn
from runtime.model import ModelConfig
from runtime.trainer import TrainConfig

# A router that drifts (strong aux loss, high lr) on a cluster where only tokens cost time: the
# greedy planner changes the placement at most steps, so a trigger on another step would show.
TINY = dict(d_model=32, n_layers=2, n_heads=2, d_ff=48, num_experts=6, top_k=2, seq_len=32, router_skew=1.0,
            aux_coef=0.5)


def run(tmp, name, cluster, **kw):
    out = tmp / f"{name}.pt"
    cfg = TrainConfig(ModelConfig(**TINY), **{"steps": 20, "batch": 2, "slots": 4, "lr": 1e-2, "progress": False,
                                              "policy": "dynamic", "interval": 3, "threshold": 1.0,
                                              "reproducible": True, "cluster": str(cluster),
                                              "result_out": str(out), **kw})
    spawn(cfg, 2, timeout=120, pg_timeout=60)
    return torch.load(out, weights_only=False)


def test_dynamic_resume_is_bit_identical(tmp_path):
    c = local_cpu(4, world_size=2)
    c = replace(c, devices=tuple(replace(d, compute=ComputeModel(0.0, 1e-3)) for d in c.devices))
    c.save(tmp_path / "c.json")
    ck = tmp_path / "ck.pt"
    straight = run(tmp_path, "straight", tmp_path / "c.json")
    run(tmp_path, "first", tmp_path / "c.json", steps=10, checkpoint=str(ck))
    state = torch.load(ck, weights_only=True)["replan"]
    assert state["pending"] is not None and state["smoothed"] is not None  # a plan was in flight at step 10
    resumed = run(tmp_path, "resumed", tmp_path / "c.json", resume=str(ck))
    assert resumed["start"] == 10
    assert straight["stats"]["committed"] >= 8, straight["stats"]  # the placement really moved
    assert any(resumed["changes"])  # ... after the resume too
    assert np.array_equal(straight["losses"][10:], resumed["losses"])
    assert straight["changes"][10:] == resumed["changes"]
    assert torch.equal(straight["experts"], resumed["experts"])  # weights and both moments
    assert all(torch.equal(straight["dense"][k], resumed["dense"][k]) for k in straight["dense"])
    placement = lambda r: [(l["slots"], l["shares"], l["owner"]) for l in r["plan"]["layers"]]  # noqa: E731
    assert placement(straight) == placement(resumed)


def test_replanner_state_round_trip_keeps_the_trigger_schedule():
    """In-process, one rank: a restored Replanner triggers on the same steps as the original."""
    from planner.plan import Plan, static_layer
    from runtime.replan import Replanner

    slots = np.array([4])
    plan = Plan(4, slots, [static_layer(4, slots)])
    make = lambda: Replanner("dynamic", rank=0, world=1, num_experts=4, slots=slots, layers=1,  # noqa: E731
                             cluster=local_cpu(4, world_size=1), interval=4, threshold=1e6, wait=True)
    loads = np.ones((1, 1, 4))
    a = make()
    for step in range(6):  # triggers after step 3
        a.poll(step, plan)
        a.after_step(step, loads, plan)
    b = make()
    b.restore(a.state())
    seen = {"a": [], "b": []}
    for step in range(6, 16):
        for name, r in (("a", a), ("b", b)):
            r.poll(step, plan)
            r.after_step(step, loads, plan)
            seen[name].append(r.last_trigger)
    assert seen["a"] == seen["b"] and len(set(seen["a"])) >= 3


def test_a_failed_periodic_checkpoint_does_not_stop_training(tmp_path, monkeypatch):
    """A full disk at a periodic checkpoint: training goes on, the final checkpoint is written."""
    from runtime import checkpoint as ckpt

    real, calls = ckpt.save, []

    def save(path, **kw):
        calls.append(kw["step"])
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(path, **kw)

    monkeypatch.setattr(ckpt, "save", save)
    ck = tmp_path / "ck.pt"
    model = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=2, top_k=1, seq_len=8)
    spawn(TrainConfig(model, steps=4, batch=1, progress=False, checkpoint=str(ck), checkpoint_every=2), 1)
    assert calls == [2, 4, 4] and torch.load(ck, weights_only=True)["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

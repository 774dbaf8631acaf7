"""Planner entry points: one layer (`plan_layer`), a whole model (`make_plan`), load prediction.

The solvers themselves are in the registry (`planner/solvers.py`); this module checks the inputs
once, runs the named solver and scores its placement with the estimator, so that every plan's
`info` carries numbers from the one cost model, whichever solver made it.
"""

from __future__ import annotations

import time

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import estimate
from cost_models.files import InputError
from planner import score
from planner.plan import LayerPlan, Plan
from planner.solvers import SOLVERS, SolveOptions, check_solver

PREDICTORS = ("last", "mean", "ema")
OBJECTIVES = ("time", "balance")


def plan_layer(cluster: Cluster, counts: np.ndarray, current: LayerPlan | None = None, *, solver: str = "greedy",
               time_budget: float = 1.0, workers: int = 1, seed: int = 0, interval: int = 50,
               layer_id: int = 0, reproducible: bool = False, objective: str = "time") -> LayerPlan:
    """Plan one layer for `counts[source, expert]`; `info` holds the estimator's view of the result.

    `time_budget` is wall-clock seconds (the ILP's); `reproducible` makes the ILP single-worker on
    deterministic time, so a fixed seed gives the same plan whatever the machine's load.
    `objective`: "time" minimises the estimated step (compute, all-to-all, sync, migration);
    "balance" minimises the compute makespan alone, as if links were free; then `objective`,
    `gap` and the bounds in `info` are the compute model's, while `step_time_s` and `migration_s`
    are still estimated on the real cluster."""
    check_solver(solver)
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "balance":
        lp = plan_layer(cluster.compute_only(), counts, current, solver=solver, time_budget=time_budget,
                        workers=workers, seed=seed, interval=interval, layer_id=layer_id, reproducible=reproducible)
        real = estimate(cluster, counts, lp.replicas(), lp.shares(), lp.owner)
        lp.info.update(objective_kind="balance", step_time_s=real.step_time,
                       migration_s=score.migration_s(cluster, current, lp.replicas(), lp.owner, interval))
        return lp
    counts = score.check_loads(cluster, counts, current, interval)
    options = SolveOptions(time_budget=time_budget, workers=workers, seed=seed, interval=interval,
                           reproducible=reproducible)
    t0 = time.perf_counter()
    placed = SOLVERS[solver](cluster, counts, current, options)
    info = dict(placed.info, solve_time_s=time.perf_counter() - t0, objective_kind="time")
    return score.finish(cluster, counts, placed.x, placed.share, placed.owner, current, interval, layer_id, info,
                        placed.verdict)


def make_plan(cluster: Cluster, loads: np.ndarray, current: Plan | None = None, **kw) -> Plan:
    """Plan every layer of `loads[layer, source, expert]`, each against its layer in `current`.

    `processes=N` (N > 1) plans the layers in N worker processes (layers are independent): the
    same plans as in one process, faster where there are cores and many or large layers (a
    process costs a fork, milliseconds)."""
    loads = np.asarray(loads)
    if loads.ndim != 3:
        raise InputError(f"loads must be 3-D [layer, source, expert], got shape {loads.shape}")
    if loads.shape[0] == 0:
        raise InputError("loads hold no layer")
    if current is not None:
        if len(current.layers) != loads.shape[0]:
            raise InputError(f"the current plan has {len(current.layers)} layers, the loads {loads.shape[0]}")
        if current.num_experts != loads.shape[2]:
            raise InputError(f"the current plan has {current.num_experts} experts, the loads {loads.shape[2]}")
    layer_ids = kw.pop("layer_ids", None)
    processes = int(kw.pop("processes", 1) or 1)
    jobs = [(loads[i], current.layers[i] if current is not None else None,
             int(layer_ids[i]) if layer_ids is not None else i) for i in range(loads.shape[0])]
    if processes > 1 and len(jobs) > 1:
        layers = _in_processes(cluster, jobs, kw, processes)
    else:
        layers = [plan_layer(cluster, ld, cur, layer_id=lid, **kw) for ld, cur, lid in jobs]
    info = {"solver": kw.get("solver", "greedy"), "layers": len(layers),
            "step_time_s": float(sum(l.info["step_time_s"] for l in layers)),
            "migration_s": float(sum(l.info["migration_s"] for l in layers)),
            "lower_bound": float(sum(l.info["lower_bound"] for l in layers)),
            "solve_time_s": float(sum(l.info["solve_time_s"] for l in layers))}
    return Plan(loads.shape[2], cluster.slots.copy(), layers, info).validate()


def _layer_job(args):
    cluster, ld, cur, lid, kw = args
    return plan_layer(cluster, ld, cur, layer_id=lid, **kw)


def _in_processes(cluster: Cluster, jobs, kw, processes: int) -> list[LayerPlan]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=ctx) as pool:
        return list(pool.map(_layer_job, [(cluster, ld, cur, lid, kw) for ld, cur, lid in jobs]))


def predict(history: np.ndarray, predictor: str = "last", window: int = 8, ema: float = 0.5) -> np.ndarray:
    """Next step's `[layer, source, expert]` loads from `history[step, layer, source, expert]`.

    `mean` averages the last `window` steps; `ema` weighs step t by ema*(1-ema)^(age)."""
    h = np.asarray(history, dtype=np.float64)
    if h.ndim != 4 or h.shape[0] == 0:
        raise InputError(f"history must be 4-D [step, layer, source, expert] with a step, got shape {h.shape}")
    if predictor == "last":
        return h[-1]
    if predictor == "mean":
        if window < 1:
            raise InputError(f"the moving-average window must be >= 1, got {window}")
        return h[-window:].mean(axis=0)
    if predictor == "ema":
        if not 0 < ema <= 1:
            raise InputError(f"the EMA weight must be in (0, 1], got {ema}")
        out = h[0].copy()
        for step in h[1:]:
            out = ema * step + (1 - ema) * out
        return out
    raise InputError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")

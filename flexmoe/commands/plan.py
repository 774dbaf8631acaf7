"""`flexmoe plan`: plan expert placement for a trace's predicted loads and print what it buys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from cost_models.cluster import Cluster
from cost_models.estimator import estimate, fold_sources
from cost_models.files import InputError
from flexmoe.commands.options import parse_layers, parse_steps
from planner.eplb_mapping import save_eplb
from planner.moves import diff, summarize
from planner.plan import Plan, static_layer
from planner.solve import OBJECTIVES, PREDICTORS, SOLVERS, make_plan, predict
from planner.trace import Trace


def plan(cluster: Annotated[Path, typer.Option("-c", "--cluster", help="cluster.json")],
         trace: Annotated[Path, typer.Option("-t", "--trace", help="routing trace (.npz or .json)")],
         output: Annotated[Path, typer.Option("-o", "--output", help="plan.json to write")],
         solver: Annotated[str, typer.Option(help=f"one of: {', '.join(SOLVERS)}")] = "ilp",
         time_budget: Annotated[float, typer.Option(help="ILP seconds per layer")] = 1.0,
         steps: Annotated[str, typer.Option(help="trace step positions A:B to predict from")] = "",
         predictor: Annotated[str, typer.Option(help=f"one of: {', '.join(PREDICTORS)}")] = "last",
         window: Annotated[int, typer.Option(help="moving-average window (steps)")] = 8,
         ema: Annotated[float, typer.Option(help="EMA weight of the newest step")] = 0.5,
         current: Annotated[Path | None, typer.Option(help="plan in force; migration is counted against it")] = None,
         layers: Annotated[str, typer.Option(help="comma-separated layer positions (default: all)")] = "",
         interval: Annotated[int, typer.Option(help="steps until the next re-plan (amortises migration)")] = 50,
         workers: int = 1, seed: int = 0,
         objective: Annotated[str, typer.Option(help="time: minimise the estimated step (compute, all-to-all, "
                                                     "sync, migration); balance: the compute makespan alone")]
         = "time",
         eplb_out: Annotated[Path | None, typer.Option(help="also write DeepSeek EPLB's mapping tensors "
                                                             "(phy2log, log2phy, logcnt) to this .npz")] = None,
         sglang_out: Annotated[Path | None, typer.Option(help="also write SGLang's --init-expert-location "
                                                               "(physical_to_logical_map) to this .pt or .json")]
         = None) -> None:
    """Plan a placement and print balance, estimated step time, bound, gap and migration."""
    c = Cluster.load(cluster)
    t = Trace.load(trace)
    sel = t.select(parse_steps(steps, t.num_steps), parse_layers(layers, t.num_layers))
    if solver not in SOLVERS:
        raise InputError(f"unknown --solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if not time_budget > 0:
        raise InputError(f"--time-budget must be positive, got {time_budget}")
    loads = predict(sel.counts, predictor, window, ema)
    cur = Plan.load(current) if current is not None else None
    if cur is not None:
        if cur.num_devices != c.num_devices or not np.array_equal(cur.slots, c.slots):
            raise InputError("the current plan's devices or slots differ from the cluster's", current)
        if cur.num_experts != sel.num_experts:
            raise InputError(f"the current plan has {cur.num_experts} experts, the trace {sel.num_experts}", current)
        if len(cur.layers) != sel.num_layers:
            raise InputError(f"the current plan has {len(cur.layers)} layers, {sel.num_layers} are planned", current)
    if objective not in OBJECTIVES:
        raise InputError(f"unknown --objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    new = make_plan(c, loads, cur, solver=solver, time_budget=time_budget, workers=workers, seed=seed,
                    interval=interval, layer_ids=sel.layer_ids, objective=objective)
    new.info.update(trace=str(trace), steps=steps or ":", predictor=predictor, cluster=c.name)
    before = cur or Plan(sel.num_experts, c.slots, [static_layer(sel.num_experts, c.slots, int(i))
                                                    for i in sel.layer_ids])
    moves = summarize(diff(before, new, c))
    if sglang_out is not None:  # checked before anything is written
        from experiments.sglang import save_expert_location, sglang_export
        phy2log, sglang_lines = sglang_export(c, loads, new, sglang_out)
    new.save(output)
    if eplb_out is not None:
        save_eplb(new, eplb_out)
    if sglang_out is not None:
        save_expert_location(phy2log, sglang_out)
    _summary(c, loads, before, new, moves, "current plan" if cur is not None else "static EP")
    if sglang_out is not None:
        typer.echo("\n".join(sglang_lines))


def _summary(c: Cluster, loads, before: Plan, new: Plan, moves: dict, what: str) -> None:
    typer.echo(f"{'layer':>5} {'balance':>15} {'step ms (' + what + ' -> plan)':>32} {'LB ms':>7} "
               f"{'bound ms':>9} {'gap':>7} {'status':>10}")
    for i, (old, lp) in enumerate(zip(before.layers, new.layers)):
        counts = fold_sources(loads[i], c.num_devices)
        e0 = estimate(c, counts, old.replicas(), old.shares(), old.owner)
        info = lp.info
        fb = " fallback" if info.get("fallback") else ""
        typer.echo(f"{lp.layer_id:>5} {e0.balance:>6.3f} -> {info['balance']:<6.3f} "
                   f"{e0.step_time * 1e3:>14.3f} -> {info['step_time_s'] * 1e3:<13.3f} "
                   f"{info['lower_bound'] * 1e3:>7.3f} {info.get('proven_bound_s', info['lower_bound']) * 1e3:>9.3f} "
                   f"{info['gap'] * 100:>6.1f}% {info.get('status', '')}{fb}")
    if any(lp.info.get("objective_kind") == "balance" for lp in new.layers):
        typer.echo("objective balance: bound and gap are the compute makespan's; step ms is the full estimate")
    typer.echo(f"moves: {moves['moves']} ({moves['weight_copies']} weight copies, {moves['owner_moves']} owner "
               f"moves), {moves['bytes'] / 2**20:.1f} MiB")

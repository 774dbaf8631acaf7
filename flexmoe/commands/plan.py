"""`flexmoe plan`: plan expert placement for a trace's predicted loads and print what it buys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from cost_models.cluster import Cluster
from cost_models.estimator import estimate, fold_sources
from cost_models.files import InputError, atomic_paths, check_outputs, finite_number, whole_number
from flexmoe import console
from flexmoe.commands.options import ObjectiveName, PredictorName, SolverName, parse_layers, parse_steps
from planner.eplb_mapping import save_eplb
from planner.moves import diff, summarize
from planner.plan import Plan, static_layer
from planner.solve import make_plan, predict
from planner.trace import Trace


def plan(cluster: Annotated[Path, typer.Option("-c", "--cluster", help="cluster.json")],
         trace: Annotated[Path, typer.Option("-t", "--trace", help="routing trace (.npz or .json)")],
         output: Annotated[Path, typer.Option("-o", "--output", help="plan.json to write")],
         solver: Annotated[SolverName,
                           typer.Option(help="ilp: CP-SAT, warm-started by the heuristics; greedy: the "
                                             "FlexMoE paper's; the others are baselines")] = "ilp",
         time_budget: Annotated[float, typer.Option(help="ILP wall-clock seconds per layer")] = 1.0,
         steps: Annotated[str, typer.Option(help="trace step positions A:B to predict from")] = "",
         predictor: Annotated[PredictorName,
                              typer.Option(help="next step's loads: the last step, the mean of --window "
                                                "steps, or an EMA with weight --ema")] = "last",
         window: Annotated[int, typer.Option(help="moving-average window (trace steps)")] = 8,
         ema: Annotated[float, typer.Option(help="EMA weight of the newest step, in (0, 1]")] = 0.5,
         current: Annotated[Path | None, typer.Option(help="plan in force; migration is counted against it")] = None,
         layers: Annotated[str, typer.Option(help="comma-separated layer positions (default: all)")] = "",
         interval: Annotated[int, typer.Option(help="training steps until the next re-plan (amortises "
                                                    "migration)")] = 50,
         workers: Annotated[int, typer.Option(help="ILP workers: CP-SAT threads; from 2 on, a spare one "
                                                     "also refines a runner-up hint in a forked process")] = 1,
         seed: Annotated[int, typer.Option(help="solver seed")] = 0,
         slots: Annotated[int, typer.Option(help="expert slots per device (0: the cluster file's)")] = 0,
         objective: Annotated[ObjectiveName,
                              typer.Option(help="time: minimise the estimated step (compute, all-to-all, "
                                                "sync, migration); balance: the compute makespan alone")]
         = "time",
         eplb_out: Annotated[Path | None, typer.Option(help="also write DeepSeek EPLB's mapping tensors "
                                                             "(phy2log, log2phy, logcnt) to this .npz")] = None,
         sglang_out: Annotated[Path | None, typer.Option(help="also write SGLang's --init-expert-location "
                                                               "(physical_to_logical_map) to this .pt or .json")]
         = None) -> None:
    """Plan a placement and print balance, estimated step time (ms), bound, gap and migration.
    Balance is max/mean tokens per device (1.0 is perfect; the inverse of vLLM's and SGLang's
    'balancedness'). The plan, --eplb-out and --sglang-out are written together or not at all."""
    _check_numbers(time_budget, ema, window, interval, workers, seed, slots)
    check_outputs({"--output": output, "--eplb-out": eplb_out, "--sglang-out": sglang_out},
                  inputs=[cluster, trace, current])
    c, sel = _cluster_and_trace(cluster, trace, slots, steps, layers, eplb_out is not None)
    loads = predict(sel.counts, predictor, window, ema)
    cur = _current_plan(current, c, sel)
    new = make_plan(c, loads, cur, solver=solver, time_budget=time_budget, workers=workers, seed=seed,
                    interval=interval, layer_ids=sel.layer_ids, objective=objective)
    new.info.update(trace=str(trace), steps=steps or ":", predictor=predictor, cluster=c.name)
    before = cur or Plan(sel.num_experts, c.slots, [static_layer(sel.num_experts, c.slots, int(i))
                                                    for i in sel.layer_ids])
    moves = summarize(diff(before, new, c))
    sglang_lines = _write(c, loads, new, output, eplb_out, sglang_out)
    _summary(c, loads, before, new, moves, "current plan" if cur is not None else "static EP")
    if sglang_lines:
        typer.echo("\n".join(sglang_lines))
    outs = [output] + [p for p in (eplb_out, sglang_out) if p is not None]
    step0 = sum(_estimate(c, loads[i], old).step_time for i, old in enumerate(before.layers))
    step1 = sum(lp.info["step_time_s"] for lp in new.layers)
    console.summary(f"wrote {', '.join(map(str, outs))}: {len(new.layers)} layers, {solver}, estimated step "
                    f"{step0 * 1e3:.3f} -> {step1 * 1e3:.3f} ms ({step0 / step1:.2f}x), worst balance "
                    f"{max(lp.info['balance'] for lp in new.layers):.3f}, {moves['moves']} moves")


def _check_numbers(time_budget, ema, window, interval, workers, seed, slots) -> None:
    finite_number(time_budget, "--time-budget", None, positive=True, maximum=86400.0)
    finite_number(ema, "--ema", None, positive=True, maximum=1.0)
    whole_number(window, "--window", None, minimum=1, maximum=10**9)
    whole_number(interval, "--interval", None, minimum=1, maximum=10**9)
    whole_number(workers, "--workers", None, minimum=1, maximum=256)
    whole_number(seed, "--seed", None, maximum=2**31 - 1)
    whole_number(slots, "--slots", None, maximum=2**16)


def _cluster_and_trace(cluster: Path, trace: Path, slots: int, steps: str, layers: str,
                       eplb: bool) -> tuple[Cluster, Trace]:
    """The cluster (with --slots) and the trace's selected steps and layers, checked to fit."""
    c = Cluster.load(cluster)
    if slots:
        c = c.with_slots(slots)
    t = Trace.load(trace)
    sel = t.select(parse_steps(steps, t.num_steps), parse_layers(layers, t.num_layers))
    c.check_fits(sel.num_experts, cluster)
    if eplb and len(set(c.slots.tolist())) != 1:
        raise InputError("--eplb-out needs the same slot count on every device", cluster)
    return c, sel


def _current_plan(current: Path | None, c: Cluster, sel: Trace) -> Plan | None:
    """--current, checked against the cluster and the planned layers."""
    if current is None:
        return None
    cur = Plan.load(current)
    if cur.num_devices != c.num_devices or not np.array_equal(cur.slots, c.slots):
        raise InputError("the current plan's devices or slots differ from the cluster's", current)
    if cur.num_experts != sel.num_experts:
        raise InputError(f"the current plan has {cur.num_experts} experts, the trace {sel.num_experts}", current)
    if len(cur.layers) != sel.num_layers:
        raise InputError(f"the current plan has {len(cur.layers)} layers, {sel.num_layers} are planned", current)
    return cur


def _write(c: Cluster, loads, new: Plan, output: Path, eplb_out: Path | None, sglang_out: Path | None) -> list[str]:
    """The plan and its exports, together or not at all; returns the SGLang export's notes."""
    sglang_lines = []
    if sglang_out is not None:  # checked before anything is written
        from experiments.sglang import save_expert_location, sglang_export
        phy2log, sglang_lines = sglang_export(c, loads, new, sglang_out)
    outs = [output] + [p for p in (eplb_out, sglang_out) if p is not None]
    with atomic_paths(*outs) as tmps:
        new.save(tmps[0])
        rest = iter(tmps[1:])
        if eplb_out is not None:
            save_eplb(new, next(rest))
        if sglang_out is not None:
            save_expert_location(phy2log, next(rest), sglang_out.suffix)
    return sglang_lines


def _estimate(c: Cluster, load, lp):
    return estimate(c, fold_sources(load, c.num_devices), lp.replicas(), lp.shares(), lp.owner)


def _summary(c: Cluster, loads, before: Plan, new: Plan, moves: dict, what: str) -> None:
    lines = [f"{'layer':>5} {'balance':>15} {'step ms (' + what + ' -> plan)':>32} {'LB ms':>7} "
             f"{'bound ms':>9} {'gap':>7} {'status':>10}"]
    for i, (old, lp) in enumerate(zip(before.layers, new.layers)):
        e0 = _estimate(c, loads[i], old)
        info = lp.info
        fb = " fallback" if info.get("fallback") else ""
        lines.append(f"{lp.layer_id:>5} {e0.balance:>6.3f} -> {info['balance']:<6.3f} "
                     f"{e0.step_time * 1e3:>14.3f} -> {info['step_time_s'] * 1e3:<13.3f} "
                     f"{info['lower_bound'] * 1e3:>7.3f} {info.get('proven_bound_s', info['lower_bound']) * 1e3:>9.3f} "
                     f"{info['gap'] * 100:>6.1f}% {info.get('status', '')}{fb}")
    if any(lp.info.get("objective_kind") == "balance" for lp in new.layers):
        lines.append("objective balance: bound and gap are the compute makespan's; step ms is the full estimate")
    lines.append(f"moves: {moves['moves']} ({moves['weight_copies']} weight copies, {moves['owner_moves']} owner "
                 f"moves), {moves['bytes'] / 2**20:.1f} MiB")
    lines.append(console.BALANCE)
    console.table("\n".join(lines))

"""`flexmoe compare`: replay a trace under several placement policies and write a report.

Heavy imports (the solvers, matplotlib) happen inside the command so `flexmoe --help` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cost_models.files import InputError, check_outputs, finite_number, whole_number
from flexmoe import console
from flexmoe.commands.options import PredictorName


def compare_cmd(
        cluster: Annotated[Path, typer.Option("-c", "--cluster", help="cluster.json")],
        trace: Annotated[Path, typer.Option("-t", "--trace", help="trace (.npz or .json; the SmartMoE "
                                                                  "excerpt .npz is read too)")],
        output: Annotated[Path, typer.Option("-o", "--output", help="report directory")],
        policies: Annotated[str, typer.Option(help="comma-separated: static, capacity, shadow, eplb, lplb, greedy, "
                                                   "ilp (static is always run: it is the baseline)")]
        = "static,capacity,shadow,eplb,lplb,greedy,ilp",
        dispatch: Annotated[Literal["adaptive", "plan", "both"],
                            typer.Option(help="token shares per step: adaptive (re-solved from each step's counts, "
                                              "kept where the estimator ranks them faster), plan (the plan's), or "
                                              "both side by side")] = "adaptive",
        interval: Annotated[int, typer.Option(help="re-plan every N trace steps (0: only on --trigger)")] = 5,
        trigger: Annotated[float, typer.Option(help="also re-plan when the last step's balance ratio "
                                                    "exceeds this (0: off)")] = 0.0,
        predictor: Annotated[PredictorName, typer.Option(help="next step's loads: the last "
                             "step, the mean of --window steps, or an EMA")] = "last",
        window: Annotated[int, typer.Option(help="past steps the predictor sees")] = 5,
        ema: Annotated[float, typer.Option(help="EMA weight of the newest step")] = 0.5,
        time_budget: Annotated[float, typer.Option(help="ILP seconds per layer and re-plan")] = 1.0,
        workers: Annotated[int, typer.Option(help="ILP workers: CP-SAT threads; from 2 on, a spare one "
                                                     "also refines a runner-up hint in a forked process")] = 1,
        seed: Annotated[int, typer.Option(help="solver seed")] = 0,
        capacity_factor: Annotated[float, typer.Option(help="capacity policy: each source's tokens per "
                                                            "expert replica, over an even share")] = 1.25,
        slots: Annotated[int, typer.Option(help="expert slots per device (0: the cluster's)")] = 0,
        steps: Annotated[int, typer.Option(help="replay only the first N trace steps (0: all)")] = 0,
        layers: Annotated[str, typer.Option(help="comma-separated layer positions (default: all)")] = "",
        stride: Annotated[int, typer.Option(help="training iterations per trace step (0: from the "
                                                 "trace's step ids)")] = 0,
        figures: Annotated[bool, typer.Option("--figures/--no-figures", help="write PNG figures")] = True,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars (only on a "
                                                                               "terminal)")] = True,
        offline_budget: Annotated[float, typer.Option(help="offline mode: at each ILP re-plan, also search "
                                                           "this many seconds for the best plan and a proven "
                                                           "bound, and report every policy's distance to it "
                                                           "(0: off)")] = 0.0,
) -> None:
    """Replay a routing trace under each policy, planning from the past only, and compare estimated
    step time (ms), speed-up over static, balance, dropped tokens, migration and planner time.
    Balance is max/mean tokens per device (1.0 is perfect; the inverse of vLLM's and SGLang's
    'balancedness'). The report's files are written together or not at all."""
    from experiments.compare import make_policies, run_all, setting_of, write_report

    _check_numbers(interval=interval, window=window, workers=workers, seed=seed, slots=slots, steps=steps,
                   stride=stride, trigger=trigger, ema=ema, time_budget=time_budget,
                   offline_budget=offline_budget, capacity_factor=capacity_factor)
    check_outputs({"--output": output}, inputs=[cluster, trace], directories=["--output"])
    c, t = _cluster_and_trace(cluster, trace, slots, steps, layers)
    names = [n.strip() for n in policies.split(",") if n.strip()]
    pols = make_policies(names, dispatch=dispatch, interval=interval, trigger=trigger or None, predictor=predictor,
                         window=window, ema=ema, time_budget=time_budget, workers=workers, seed=seed,
                         capacity_factor=capacity_factor)
    kw = _offline(offline_budget, names, workers)
    results = run_all(t, c, pols, stride=stride or None, progress=console.progress(progress), **kw)
    setting = setting_of(trace, cluster, t, c, pols[0], stride or None)
    setting["offline_budget"] = offline_budget
    written = write_report(output, results, setting, figures=figures)
    _print_report(output, setting, written, offline_budget)


def _check_numbers(*, trigger, ema, time_budget, offline_budget, capacity_factor, **whole) -> None:
    """`whole`: the whole-number options by name (--window and --workers at least 1, the rest 0)."""
    for name, value in whole.items():
        flag = "--" + name.replace("_", "-")
        whole_number(value, flag, None, minimum=1 if name in ("window", "workers") else 0, maximum=2**31 - 1)
    finite_number(trigger, "--trigger", None, minimum=0.0, maximum=1e6)
    finite_number(ema, "--ema", None, positive=True, maximum=1.0)
    finite_number(time_budget, "--time-budget", None, positive=True, maximum=86400.0)
    finite_number(offline_budget, "--offline-budget", None, minimum=0.0, maximum=86400.0)
    finite_number(capacity_factor, "--capacity-factor", None, positive=True, maximum=1e6)


def _cluster_and_trace(cluster: Path, trace: Path, slots: int, steps: int, layers: str):
    """The cluster (with --slots) and the trace cut to --layers and the first --steps, checked to fit."""
    from cost_models.cluster import Cluster
    from experiments.compare import load_trace
    from flexmoe.commands.options import parse_layers

    c = Cluster.load(cluster)
    t = load_trace(trace)
    if slots:  # >= 0 already (_check_numbers)
        c = c.with_slots(slots)
    c.check_fits(t.num_experts, cluster)
    if layers:
        t = t.select(layers=parse_layers(layers, t.num_layers))
    if steps:
        t = t.select(steps=slice(0, steps))
    return c, t


def _offline(offline_budget: float, names: list[str], workers: int) -> dict:
    """run_all's extra arguments for --offline-budget (none when it is 0)."""
    if not offline_budget:
        return {}
    from experiments.offline import offline_plan_fn
    if "ilp" not in names:
        raise InputError("--offline-budget compares against the ILP's re-plans: add ilp to --policies")
    return {"plan_fn": offline_plan_fn(offline_budget, max(workers, 1))}


def _print_report(output: Path, setting: dict, written: dict, offline_budget: float) -> None:
    from experiments.compare import text_table

    console.table(f"{setting['trace_desc']}\non {setting['cluster_desc']}")
    console.table(text_table(written["rows"]))
    opt = written["optimality"]
    if opt:
        console.table(f"heuristic vs optimal over {opt['replans']} ILP re-plans: greedy at most "
                      f"{opt['greedy_over_ilp_max_pct']:.1f}% above the ILP "
                      f"(mean {opt['greedy_over_ilp_mean_pct']:.1f}%), "
                      f"at most {opt['greedy_over_bound_max_pct']:.1f}% above the proven bound; "
                      f"ILP fallbacks {opt['ilp_fallbacks']}")
    off = written.get("offline")
    if off:
        console.table(f"offline ({offline_budget:g} s per instance, {off['replans']} re-plans): distance to the "
                      "proven bound, median / p90: " + ", ".join(
                          f"{p} {off[p]['median']:.1f}% / {off[p]['p90']:.1f}%"
                          for p in ("offline", "ilp", "greedy", "eplb") if p in off))
    console.table("planner time is wall clock, off the critical path: not added to step time\n" + console.BALANCE)
    best = min(written["rows"], key=lambda r: (r["dropped_pct"] > 0, r["mean_step_ms"]))
    console.summary(f"wrote {output}/ ({len(written['files'])} files): fastest without dropping tokens: "
                    f"{best['policy']}, {best['speedup']:.2f}x static")

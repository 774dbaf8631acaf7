"""Benchmark of the per-step dispatcher: shares LP plus whole-token routing, per MoE layer.

For each setting a placement is planned from one step's loads and then dispatched on the next
sampled step (10 training iterations later on the real excerpt): the table shows the time of
each part on one CPU core, and what per-step shares buy over the plan's own shares (compute
balance, max/mean tokens per device, and the estimator's step time).

    OPENBLAS_NUM_THREADS=1 python -m experiments.bench_dispatch [--excerpt PATH] [--repeat N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cost_models.estimator import estimate
from cost_models.presets import preset
from cost_models.routing import route_table
from experiments.traces import import_smartmoe, synth
from planner.solve import plan_layer
from planner.step_shares import ShareRule, StepShares

EXCERPT = Path(__file__).resolve().parents[2] / "shared" / "traces" / "smartmoe_excerpt.npz"


def _best_of(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls (the first, which builds caches, is not counted)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_setting(name: str, cluster, pairs, solver: str, repeat: int) -> dict:
    """`pairs`: (loads planned from, loads dispatched) per instance."""
    rows = []
    for past, now in pairs:
        plan = plan_layer(cluster, past, solver=solver, time_budget=1.0)
        x, share, owner = plan.replicas(), plan.shares(), plan.owner
        counts = np.asarray(now, dtype=np.int64)
        build = _best_of(lambda: StepShares(cluster, x), 3)
        lp = StepShares(cluster, x)
        rule = ShareRule(cluster)
        step_share = rule(counts, x, share, owner)  # the LP's shares where the estimator ranks them faster
        t_lp = _best_of(lambda: lp.solve(counts), repeat)
        t_rule = _best_of(lambda: rule(counts, x, share, owner), repeat)
        t_route = _best_of(lambda: route_table(counts, x, step_share, cluster.node_of), repeat)
        before, after = estimate(cluster, counts, x, share, owner), estimate(cluster, counts, x, step_share, owner)
        rows.append({"lp_ms": 1e3 * t_lp, "rule_ms": 1e3 * t_rule, "route_ms": 1e3 * t_route, "build_ms": 1e3 * build,
                     "lp_used": float(step_share is not share),
                     "bal_plan": before.balance, "bal_step": after.balance,
                     "step_plan_ms": 1e3 * before.step_time, "step_step_ms": 1e3 * after.step_time,
                     "replicated": int((x.sum(axis=1) > 1).sum())})
    return {"name": name, "rows": rows}


def table(results: list[dict]) -> str:
    head = ("setting", "n", "LP ms", "LP + judge ms", "route ms", "total ms (p90)", "LP build ms", "LP shares used",
            "balance plan->step (median)", "balance p90", "est. step ms plan->step")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        a = {k: np.array([row[k] for row in r["rows"]]) for k in r["rows"][0]}
        total = a["rule_ms"] + a["route_ms"]
        lines.append(" | ".join([
            r["name"], str(len(r["rows"])), f"{np.median(a['lp_ms']):.2f}", f"{np.median(a['rule_ms']):.2f}",
            f"{np.median(a['route_ms']):.2f}", f"{np.median(total):.2f} ({np.percentile(total, 90):.2f})",
            f"{np.median(a['build_ms']):.1f}", f"{100 * a['lp_used'].mean():.0f}%",
            f"{np.median(a['bal_plan']):.3f} -> {np.median(a['bal_step']):.3f}",
            f"{np.percentile(a['bal_plan'], 90):.3f} -> {np.percentile(a['bal_step'], 90):.3f}",
            f"{a['step_plan_ms'].mean():.2f} -> {a['step_step_ms'].mean():.2f}"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--excerpt", type=Path, default=EXCERPT)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--instances", type=int, default=12, help="instances per setting")
    args = ap.parse_args(argv)
    results = []
    if args.excerpt.exists():
        trace = import_smartmoe(args.excerpt)
        a100 = preset("dgx-a100-2x8", slots=3)
        steps = np.linspace(1, trace.num_steps - 1, max(args.instances // trace.num_layers, 1)).astype(int)
        pairs = [(trace.counts[t - 1, l], trace.counts[t, l]) for t in steps for l in range(trace.num_layers)]
        for solver in ("ilp", "eplb"):
            results.append(run_setting(f"real excerpt, 32 experts x 16 GPUs x 3 slots, {solver} placement", a100,
                                       pairs, solver, args.repeat))
    else:
        print(f"(no excerpt at {args.excerpt}: synthetic settings only)")
    big = synth("drift", steps=args.instances + 1, layers=1, sources=64, experts=256, seed=0)
    h100 = preset("dgx-h100-8x8", slots=5)
    pairs = [(big.counts[t - 1, 0], big.counts[t, 0]) for t in range(1, args.instances + 1)]
    results.append(run_setting("synthetic drift, 256 experts x 64 GPUs (8 nodes) x 5 slots, greedy placement",
                               h100, pairs, "greedy", args.repeat))
    print(table(results))
    print("LP: GLOP on the model built once per placement; judge: the estimator ranks the LP's and the plan's "
          "shares for the step's counts; route: whole tokens, node-first; one CPU core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

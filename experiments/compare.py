"""Run placement policies side by side on one trace and cluster; tables, CSV and Markdown.

Everything is computed before anything is written, and the report's files are put in place
together (`atomic_paths`), so a bad input or a failed write never leaves a partial report.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from cost_models.cluster import Cluster
from cost_models.files import InputError, atomic_paths, read_npz
from experiments.replay import FIXED, POLICIES, Policy, ReplayResult, reference_replans, replay, trace_stride
from planner.step_shares import DISPATCH_MODES
from experiments.traces import import_smartmoe
from planner.trace import Trace


def load_trace(path: str | os.PathLike) -> Trace:
    """A `flexmoe.trace/1` file, or the SmartMoE excerpt layout (`counts[iteration, layer, source,
    micro_batch, expert]` with `iters` and `layers`, micro-batches summed), since that is the real
    trace users are pointed at."""
    try:
        return Trace.load(path)
    except InputError as first:
        if Path(path).suffix == ".json":
            raise
        try:
            arrays = read_npz(path, "trace")
        except InputError:
            raise first from None
        excerpt = "meta" not in arrays and "counts" in arrays and arrays["counts"].ndim == 5
        if not excerpt:
            raise first from None
        return import_smartmoe(path, "sum")


def make_policies(names: list[str], dispatch: str = "adaptive", **common) -> list[Policy]:
    """Policies by name with shared settings; static always comes first (it is the baseline), and
    the ILP carries greedy as its reference so each re-plan compares heuristic and optimum.
    `dispatch` is "adaptive", "plan" or "both" (each re-placing policy twice, side by side); static
    and capacity have one replica per expert, so their dispatch has nothing to choose; `lplb` is
    adaptive by definition, and when it runs, `eplb` keeps EPLB's own even shares (as published)."""
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise InputError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    if dispatch not in DISPATCH_MODES + ("both",):
        raise InputError(f"unknown dispatch {dispatch!r}; choose from {', '.join(DISPATCH_MODES + ('both',))}")
    ordered = ["static"] + [n for n in POLICIES if n in names and n != "static"]
    out = []
    for n in ordered:
        if n == "lplb":
            modes = ["adaptive"]
        elif n in FIXED or (n == "eplb" and "lplb" in ordered):  # EPLB as published; lplb is its adaptive twin
            modes = ["plan"]
        else:
            modes = ["adaptive", "plan"] if dispatch == "both" else [dispatch]
        for mode in modes:
            name = f"{n} (plan shares)" if dispatch == "both" and len(modes) == 2 and mode == "plan" else n
            out.append(Policy(name, n, reference="greedy" if n == "ilp" else None, dispatch=mode, **common).check())
    return out


def run_all(trace: Trace, cluster: Cluster, policies: list[Policy], *, stride: int | None = None,
            progress: bool = False, **kw) -> list[ReplayResult]:
    cluster.check_fits(trace.num_experts, "cluster")
    return [replay(trace, cluster, p, stride=stride, progress=progress, **kw) for p in policies]


COLUMNS = [("policy", "policy", "{}"), ("mean_step_ms", "mean step (ms)", "{:.3f}"),
           ("speedup", "speed-up vs static", "{:.2f}x"), ("mean_balance", "mean balance", "{:.2f}"),
           ("median_balance", "median balance", "{:.3f}"), ("p90_balance", "p90 balance", "{:.3f}"),
           ("worst_balance", "worst balance", "{:.2f}"), ("dropped_pct", "dropped tokens (%)", "{:.2f}"),
           ("migration_mib", "migration (MiB)", "{:.1f}"), ("replans", "re-plans", "{}"),
           ("planner_s", "planner time (s)", "{:.2f}")]


def summary_rows(results: list[ReplayResult]) -> list[dict]:
    base = next(r for r in results if r.policy.solver == "static").step_time.mean()
    rows = []
    for r in results:
        s = r.summary()
        rows.append({"policy": s["policy"], "mean_step_ms": 1e3 * s["mean_step_s"],
                     "speedup": base / s["mean_step_s"], "mean_balance": s["mean_balance"],
                     "median_balance": s["median_balance"], "p90_balance": s["p90_balance"],
                     "worst_balance": s["worst_balance"], "dropped_pct": s["dropped_pct"],
                     "dropped_tokens": s["dropped_tokens"], "migration_mib": s["migration_bytes"] / 2**20,
                     "migration_bytes": s["migration_bytes"], "migration_s": s["migration_s"],
                     "replans": s["replans"], "planner_s": s["planner_s"]})
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(t for _, t, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k == "policy" else "---:" for k, _, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(f.format(r[k]) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def text_table(rows: list[dict]) -> str:
    cells = [[t for _, t, _ in COLUMNS]] + [[f.format(r[k]) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def optimality(results: list[ReplayResult]) -> dict | None:
    """Heuristic versus optimal over the ILP policy's re-plans (greedy run on the same inputs):
    the worst and mean excess of greedy's objective over the ILP's objective and over its bound."""
    recs = [rec for rec in reference_replans(results) if rec.get("objective") is not None]
    if not recs:
        return None
    g = np.array([rec["ref_objective"] for rec in recs])
    opt = np.array([rec["objective"] for rec in recs])
    bound = np.array([rec.get("proven_bound_s") or rec.get("lower_bound") or 0.0 for rec in recs])
    best = np.minimum(g, opt)  # the ILP is hinted with greedy; never call the worse of the two optimal
    vs_best = g / best - 1.0
    vs_bound = np.where(bound > 0, g / np.where(bound > 0, bound, 1.0) - 1.0, np.nan)
    return {"replans": len(recs), "greedy_over_ilp_max_pct": 100 * float(vs_best.max()),
            "greedy_over_ilp_mean_pct": 100 * float(vs_best.mean()),
            "greedy_over_bound_max_pct": 100 * float(np.nanmax(vs_bound)),
            "ilp_gap_max_pct": 100 * float(np.nanmax(opt / np.where(bound > 0, bound, 1.0) - 1.0)),
            "ilp_fallbacks": int(sum(bool(rec.get("fallback")) for rec in recs)),
            "ilp_solve_s_mean": float(np.mean([rec.get("solve_time_s") or 0.0 for rec in recs])),
            "greedy_solve_s_mean": float(np.mean([rec.get("ref_solve_time_s") or 0.0 for rec in recs]))}


def _csv(rows: list[dict], fields: list[str] | None = None) -> str:
    buf = io.StringIO()
    if fields is None:
        fields = list(rows[0]) if rows else []
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in fields})
    return buf.getvalue()


def _cell(v):
    if isinstance(v, float):
        return f"{v:.9g}"
    return "" if v is None else v


def step_rows(results: list[ReplayResult]) -> list[dict]:
    rows = []
    for r in results:
        st = r.step_time
        for t in range(len(st)):
            rows.append({"policy": r.policy.name, "step": t, "step_id": int(r.step_ids[t]), "step_time_s": st[t],
                         "balance_mean": float(r.balance[t].mean()), "balance_max": float(r.balance[t].max()),
                         "dropped_tokens": int(r.dropped[t]), "migration_s": float(r.migration_s[t]),
                         "migration_bytes": int(r.migration_bytes[t])})
    return rows


REPLAN_FIELDS = ["policy", "step", "step_id", "layer", "solver", "status", "objective", "lower_bound",
                 "proven_bound_s", "gap", "solve_time_s", "wall_s", "fallback", "balance", "migration_bytes",
                 "ref_solver", "ref_objective", "ref_solve_time_s", "error"]


def report_markdown(rows: list[dict], opt: dict | None, setting: dict, figures: list[str]) -> str:
    lines = [f"# Policy comparison: {setting['trace']} on {setting['cluster']}", "",
             f"- trace: {setting['trace_desc']}",
             f"- cluster: {setting['cluster_desc']}",
             f"- re-plan every {setting['interval']} trace steps ({setting['interval'] * setting['stride']} "
             f"training iterations; each trace step stands for {setting['stride']})"
             + (f", or when the observed balance exceeds {setting['trigger']}" if setting.get("trigger") else "")
             + f"; predictor `{setting['predictor']}` over the last {setting['window']} steps; "
               f"ILP budget {setting['time_budget']} s per layer with {setting['workers']} worker(s); "
               f"capacity factor {setting['capacity_factor']}",
             "- every policy starts from static expert parallelism and plans only from steps already seen;",
             "  step time is the estimator's, summed over layers, per training iteration, with migration charged",
             "  once per plan change (spread over the iterations its trace step stands for);",
             "- planner time is wall clock on this machine and is *not* added to step time: planning runs",
             "  off the critical path, in the background;",
             "- every policy runs static expert parallelism until its first re-plan.", "",
             markdown_table(rows), ""]
    if opt:
        lines += ["## Heuristic versus optimal", "",
                  f"Over {opt['replans']} layer re-plans of the ILP policy (greedy run on the same predicted loads "
                  f"and current placement): greedy's objective is at most {opt['greedy_over_ilp_max_pct']:.1f}% "
                  f"(mean {opt['greedy_over_ilp_mean_pct']:.1f}%) above the ILP's, and at most "
                  f"{opt['greedy_over_bound_max_pct']:.1f}% above the best proven bound. The ILP's own gap to "
                  f"that bound is at most {opt['ilp_gap_max_pct']:.1f}%; it fell back to greedy "
                  f"{opt['ilp_fallbacks']} times. Mean solve time: ILP {opt['ilp_solve_s_mean']:.2f} s, "
                  f"greedy {opt['greedy_solve_s_mean'] * 1e3:.1f} ms.", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    lines += ["Files: `summary.csv` (this table), `steps.csv` (every step of every policy), "
              "`replans.csv` (every re-plan: objective, bound, gap, solve time).", ""]
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, results: list[ReplayResult], setting: dict,
                 figures: bool = True) -> dict:
    """Compute every table and figure in memory, then write them; returns what was written."""
    out_dir = Path(out_dir)
    rows = summary_rows(results)
    opt = optimality(results)
    replans = [rec for r in results for rec in r.replans]
    # the offline mode (experiments/offline.py) adds columns, a report section and a figure
    from experiments import offline
    off = offline.summary(replans)
    fields = REPLAN_FIELDS + (offline.FIELDS if off else [])
    texts = {"summary.csv": _csv(rows), "steps.csv": _csv(step_rows(results)),
             "replans.csv": _csv(replans, fields)}
    images = {}
    if figures:
        from experiments.figures import render_all
        images = render_all(results, rows)  # name -> PNG bytes, rendered before anything is written
        if off:
            images["offline_gaps.png"] = offline.figure(replans)
    texts["report.md"] = report_markdown(rows, opt, setting, list(images))
    if off:
        texts["report.md"] += "\n" + offline.markdown(off, setting.get("offline_budget", 0.0))
    blobs = {name: text.encode() for name, text in texts.items()} | images
    with atomic_paths(*(out_dir / name for name in blobs)) as tmps:  # the whole report, or none of it
        for tmp, data in zip(tmps, blobs.values()):
            tmp.write_bytes(data)
    return {"rows": rows, "optimality": opt, "offline": off, "files": sorted(texts) + sorted(images)}


def describe(trace: Trace, cluster: Cluster) -> tuple[str, str]:
    t = (f"{trace.num_steps} steps (training steps {int(trace.step_ids[0])}..{int(trace.step_ids[-1])}) x "
         f"{trace.num_layers} layers {trace.layer_ids.tolist()} x {trace.num_sources} sources x "
         f"{trace.num_experts} experts, top-{trace.top_k}, origin {trace.origin or '?'}")
    c = (f"{cluster.name}, {cluster.num_devices} devices on {cluster.num_nodes} nodes, slots "
         f"{sorted(set(cluster.slots.tolist()))} per device ({int(cluster.slots.sum())} in all)")
    return t, c


def setting_of(trace_path, cluster_path, trace: Trace, cluster: Cluster, policy: Policy, stride: int | None) -> dict:
    t, c = describe(trace, cluster)
    return {"trace": Path(trace_path).name, "cluster": Path(cluster_path).name if cluster_path else cluster.name,
            "trace_desc": t, "cluster_desc": c, "interval": policy.interval, "trigger": policy.trigger,
            "stride": stride if stride is not None else trace_stride(trace), "predictor": policy.predictor,
            "window": policy.window, "time_budget": policy.time_budget, "workers": policy.workers,
            "capacity_factor": policy.capacity_factor}

"""Figures of a policy comparison, rendered to PNG bytes (Agg backend, no display needed).

Rendering to memory first lets the report writer put every file in place only once all of them
exist, so a plotting failure never leaves a partial report.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.replay import ReplayResult, reference_replans  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# Lines that may lie on top of each other stay distinguishable: each policy gets its own dash
# pattern and marker, and earlier (wider) lines show around later ones.
STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "x")]
MAX_LAYER_LINES = 4  # more layers than this: the optimality figure shows their sum instead


def _drops(r: ReplayResult) -> bool:
    return bool(np.asarray(r.dropped).sum() > 0)


def _lines(ax, results: list[ReplayResult], values) -> None:
    n = len(results)
    for i, r in enumerate(results):
        ls, marker = STYLES[i % len(STYLES)]
        y = values(r)
        label = r.policy.name + (" (drops tokens)" if _drops(r) else "")
        ax.plot(r.step_ids, y, ls=ls, lw=1.0 + 1.6 * (n - 1 - i) / max(n - 1, 1), label=label,
                color="0.6" if _drops(r) else plt.cm.tab10(i % 10), marker=marker,
                markevery=max(1, len(y) // 12), ms=4, alpha=0.9)


def step_time_figure(results: list[ReplayResult]) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 4))
    _lines(ax, results, lambda r: 1e3 * r.step_time)
    ax.set_xlabel("training step")
    ax.set_ylabel("estimated step time (ms)")
    ax.set_title("Step time over training (migration charged at plan changes)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    return _png(fig)


def balance_figure(results: list[ReplayResult]) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 4))
    _lines(ax, results, lambda r: r.balance.mean(axis=1))
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("balance (max / mean tokens per device)")
    ax.set_title("Balance over training (mean over layers; 1.0 is perfect)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    return _png(fig)


def speedup_figure(rows: list[dict]) -> bytes:
    """Speed-up bars; a policy that drops tokens is hatched, grey, and says how many it drops:
    its speed is bought with lost tokens, not comparable with the dropless ones."""
    fig, ax = plt.subplots(figsize=(max(6.5, 0.7 * len(rows)), 4.2))
    names = [r["policy"] for r in rows]
    vals = [r["speedup"] for r in rows]
    drops = [r.get("dropped_pct", 0) > 0 for r in rows]
    colors = ["0.75" if d else plt.cm.tab10(i % 10) for i, d in enumerate(drops)]
    bars = ax.bar(names, vals, color=colors, hatch=["//" if d else "" for d in drops], edgecolor="k", lw=0.5)
    labels = [f"{v:.2f}x" + (f"\ndrops {r['dropped_pct']:.0f}%\nof tokens" if d else "")
              for v, r, d in zip(vals, rows, drops)]
    ax.bar_label(bars, labels=labels, fontsize=8)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_ylim(0, max(vals) * 1.3)
    ax.set_ylabel("speed-up over static EP")
    ax.set_title("Mean step time, speed-up over static expert parallelism\n(hatched: drops tokens, not comparable)",
                 fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor")  # long names stay apart
    return _png(fig)


def optimality_figure(results: list[ReplayResult]) -> bytes | None:
    """Greedy objective, ILP objective and proven bound at each re-plan, and the solve times: per
    layer for a few layers, summed over layers (solve times: mean and range) for many."""
    recs = reference_replans(results)
    if not recs:
        return None
    layers = sorted({rec["layer"] for rec in recs})
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax, ax2 = axes
    if len(layers) <= MAX_LAYER_LINES:
        groups = [(f", layer {lid}", [rec for rec in recs if rec["layer"] == lid]) for lid in layers]
        for i, (suffix, rs) in enumerate(groups):
            x = [rec["step_id"] for rec in rs]
            c = plt.cm.tab10(i % 10)
            ax.plot(x, [1e3 * rec["ref_objective"] for rec in rs], "o--", color=c, ms=5, lw=2.2, alpha=0.7,
                    label=f"greedy{suffix}")
            ax.plot(x, [1e3 * rec["objective"] for rec in rs], "s-", color=c, ms=3, lw=1.0, label=f"ILP{suffix}")
            bound = [1e3 * (rec.get("proven_bound_s") or rec.get("lower_bound") or np.nan) for rec in rs]
            ax.plot(x, bound, ":", color=c, lw=1.0, label=f"bound{suffix}")
            ax2.plot(x, [rec.get("solve_time_s") or 0.0 for rec in rs], "s-", color=c, ms=3, lw=1.0)
            ax2.plot(x, [rec.get("ref_solve_time_s") or 0.0 for rec in rs], "o--", color=c, ms=3, lw=0.8)
        title = "Heuristic versus optimal at each re-plan"
    else:
        steps = sorted({rec["step_id"] for rec in recs})
        by = {s: [rec for rec in recs if rec["step_id"] == s] for s in steps}

        def total(key):
            return [1e3 * sum(rec.get(key) or 0.0 for rec in by[s]) for s in steps]
        bound = [1e3 * sum(rec.get("proven_bound_s") or rec.get("lower_bound") or 0.0 for rec in by[s]) for s in steps]
        ax.plot(steps, total("ref_objective"), "o--", color="C1", ms=5, lw=2.2, alpha=0.7, label="greedy")
        ax.plot(steps, total("objective"), "s-", color="C0", ms=3, lw=1.0, label="ILP")
        ax.plot(steps, bound, ":", color="k", lw=1.0, label="proven bound")
        for key, c, style in (("solve_time_s", "C0", "s-"), ("ref_solve_time_s", "C1", "o--")):
            t = [[rec.get(key) or 0.0 for rec in by[s]] for s in steps]
            ax2.plot(steps, [np.mean(v) for v in t], style, color=c, ms=3, lw=1.0)
            ax2.fill_between(steps, [min(v) for v in t], [max(v) for v in t], color=c, alpha=0.15)
        title = f"Heuristic versus optimal at each re-plan (sum over {len(layers)} layers)"
    ax.set_ylabel("objective (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xlabel("training step of the re-plan")
    ax2.set_ylabel("solve time (s); solid ILP, dashed greedy" + ("" if len(layers) <= MAX_LAYER_LINES
                                                                 else "\n(mean, band: range over layers)"),
                   fontsize=8)
    ax2.grid(alpha=0.3)
    return _png(fig)


def render_all(results: list[ReplayResult], rows: list[dict]) -> dict[str, bytes]:
    figs = {"step_time.png": step_time_figure(results), "balance.png": balance_figure(results),
            "speedup.png": speedup_figure(rows)}
    opt = optimality_figure(results)
    if opt is not None:
        figs["optimality.png"] = opt
    return figs

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

from experiments.replay import ReplayResult  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def step_time_figure(results: list[ReplayResult]) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        ax.plot(r.step_ids, 1e3 * r.step_time, label=r.policy.name, lw=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("estimated step time (ms)")
    ax.set_title("Step time over training (migration charged at plan changes)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    return _png(fig)


def balance_figure(results: list[ReplayResult]) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        ax.plot(r.step_ids, r.balance.mean(axis=1), label=r.policy.name, lw=1.2)
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("balance ratio (max / mean tokens per device)")
    ax.set_title("Balance over training (mean over layers)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    return _png(fig)


def speedup_figure(rows: list[dict]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["policy"] for r in rows]
    vals = [r["speedup"] for r in rows]
    bars = ax.bar(names, vals, color=plt.cm.tab10(np.arange(len(rows)) % 10))
    ax.bar_label(bars, labels=[f"{v:.2f}x" for v in vals], fontsize=8)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_ylabel("speed-up over static EP")
    ax.set_title("Mean step time, speed-up over static expert parallelism")
    return _png(fig)


def optimality_figure(results: list[ReplayResult]) -> bytes | None:
    """Greedy objective, ILP objective and proven bound at each re-plan, and the solve times."""
    recs = [rec for r in results for rec in r.replans if rec.get("ref_objective") is not None]
    if not recs:
        return None
    layers = sorted({rec["layer"] for rec in recs})
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax, ax2 = axes
    for i, lid in enumerate(layers):
        rs = [rec for rec in recs if rec["layer"] == lid]
        x = [rec["step_id"] for rec in rs]
        c = plt.cm.tab10(i % 10)
        ax.plot(x, [1e3 * rec["ref_objective"] for rec in rs], "o--", color=c, ms=3, lw=0.8,
                label=f"greedy, layer {lid}")
        ax.plot(x, [1e3 * rec["objective"] for rec in rs], "s-", color=c, ms=3, lw=1.0, label=f"ILP, layer {lid}")
        bound = [1e3 * (rec.get("proven_bound_s") or rec.get("lower_bound") or np.nan) for rec in rs]
        ax.plot(x, bound, ":", color=c, lw=1.0, label=f"bound, layer {lid}")
        ax2.plot(x, [rec.get("solve_time_s") or 0.0 for rec in rs], "s-", color=c, ms=3, lw=1.0)
        ax2.plot(x, [rec.get("ref_solve_time_s") or 0.0 for rec in rs], "o--", color=c, ms=3, lw=0.8)
    ax.set_ylabel("objective (ms)")
    ax.set_title("Heuristic versus optimal at each re-plan")
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xlabel("training step of the re-plan")
    ax2.set_ylabel("solve time (s); solid ILP, dashed greedy")
    ax2.grid(alpha=0.3)
    return _png(fig)


def render_all(results: list[ReplayResult], rows: list[dict]) -> dict[str, bytes]:
    figs = {"step_time.png": step_time_figure(results), "balance.png": balance_figure(results),
            "speedup.png": speedup_figure(rows)}
    opt = optimality_figure(results)
    if opt is not None:
        figs["optimality.png"] = opt
    return figs

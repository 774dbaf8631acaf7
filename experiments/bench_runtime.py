"""Benchmark: static expert parallelism against live re-placement on a skewed routing, 2 gloo ranks.

Prints a table (not a timed test): tokens/s and step time of both runs, and the step time of the
steps that switched placement against steady steps. The skew comes from the model's fixed router
bias (`router_skew`), which sends most tokens to low expert ids, i.e. to rank 0 under static
expert parallelism.

    .venv/bin/python experiments/bench_runtime.py [--steps 40] [--skew 2.0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.defaults import REPLAN_THRESHOLD  # noqa: E402
from runtime.launch import spawn  # noqa: E402
from runtime.model import ModelConfig  # noqa: E402
from runtime.trainer import TrainConfig  # noqa: E402


def run(policy: str, args, out: Path, dispatch: str = "adaptive") -> dict:
    model = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, d_ff=args.d_ff,
                        num_experts=args.experts, top_k=args.top_k, seq_len=args.seq_len, router_skew=args.skew)
    cfg = TrainConfig(model, steps=args.steps, batch=args.batch, policy=policy, solver=args.solver,
                      interval=args.forced_every if policy == "random" else args.interval,
                      threshold=args.threshold, progress=False, result_out=str(out), seed=args.seed,
                      slots=args.slots, time_budget=args.time_budget, dispatch=dispatch)
    spawn(cfg, 2, timeout=1800)
    return torch.load(out, weights_only=False)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skew", type=float, default=2.0)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--interval", type=int, default=15)
    p.add_argument("--solver", default="greedy")
    p.add_argument("--threshold", type=float, default=REPLAN_THRESHOLD)
    p.add_argument("--slots", type=int, default=0, help="expert slots per rank (0: one spare)")
    p.add_argument("--time-budget", type=float, default=1.0, help="solver budget (ilp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved static/live run pairs")
    p.add_argument("--forced-every", type=int, default=3, help="steps between forced random plans (change-cost run)")
    return p.parse_args()


def series(r: dict, w: int) -> tuple:
    """(wall seconds, straggler busy seconds, changed, balance, steady) per step after `w` warm-up steps."""
    changed = np.array(r["changes"][w:])
    steady = np.zeros(len(changed), dtype=bool)
    if changed.any():
        steady[int(np.argmax(changed)) + 1:] = True
    return (np.array(r["step_times"][w:]), np.asarray(r["cpu_times"])[w:].max(axis=1), changed,
            np.array(r["balances"][w:]), steady & ~changed)


def collect(args) -> tuple[dict, list, list, list]:
    """Every run's `series` by kind, the live runs' re-plan stats and share stats, and (straggler
    tokens, straggler busy seconds) per step for the fit. Runs are interleaved: this machine is
    shared, and its speed drifts by tens of percent."""
    w = args.warmup
    kinds = {"static": ("static", "plan"), "dynamic": ("dynamic", "adaptive"), "plan": ("dynamic", "plan"),
             "random": ("random", "adaptive")}
    runs = {k: [] for k in kinds}
    stats, shares, fit = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for kind, (policy, dispatch) in kinds.items():
                r = run(policy, args, Path(tmp) / f"{kind}{i}.pt", dispatch)
                runs[kind].append(series(r, w))
                if kind == "dynamic":
                    stats.append(r["stats"])
                    shares.append(r["shares"])
                if kind in ("static", "dynamic", "plan"):  # straggler busy time against its tokens
                    fit.append((np.asarray(r["device_tokens"])[w:].max(axis=1), series(r, w)[1]))
    return runs, stats, shares, fit


def print_step_table(args, runs: dict) -> None:
    """Step time, tokens/s and balance of static EP against the live runs (whole run and steady)."""
    tok = args.batch * 2 * args.seq_len

    def cat(policy, k):
        return np.concatenate([r[k] for r in runs[policy]])

    s_wall, s_busy, s_bal = cat("static", 0), cat("static", 1), cat("static", 3)
    rows = [("static EP", s_wall, s_busy, s_bal)]
    for kind, label in (("plan", "live, plan shares"), ("dynamic", "live, per-step shares")):
        l_wall, l_busy, changes, l_bal, settled = (cat(kind, k) for k in range(5))
        rows.append((f"{label}, whole run", l_wall, l_busy, l_bal))
        if settled.any():
            rows.append((f"{label}, steady", l_wall[settled], l_busy[settled], l_bal[settled]))
    print(f"\nworld size 2 (gloo, 1 thread per rank), {args.repeats} x {args.steps} steps per policy "
          f"({args.warmup} warm-up steps dropped per run), "
          f"{tok} tokens/step, skew {args.skew}, top-{args.top_k}, {args.experts} experts, d_ff {args.d_ff}, "
          f"solver {args.solver}, slots {args.slots or 'auto'}")
    print("wall: measured step time on this shared machine; busy: the straggler rank's own CPU time per step "
          "(the step time on dedicated cores)")
    print(f"{'run':<30} {'wall ms':>8} {'tok/s':>7} {'x':>5} {'busy ms':>8} {'tok/s':>7} {'x':>5} {'balance':>8}")
    for name, wall, busy, bal in rows:
        print(f"{name:<30} {wall.mean() * 1e3:>8.1f} {tok / wall.mean():>7.0f} {s_wall.mean() / wall.mean():>5.2f} "
              f"{busy.mean() * 1e3:>8.1f} {tok / busy.mean():>7.0f} {s_busy.mean() / busy.mean():>5.2f} "
              f"{bal.mean():>8.2f}")


def print_overheads(args, stats: list, shares: list, fit: list) -> None:
    """Per-step share solves, the straggler's time against its tokens, and each plan's switch and solve time."""
    solves = sum(sh["solves"] for sh in shares)
    print(f"per-step shares: {1e3 * sum(sh['seconds'] for sh in shares) / max(solves, 1):.2f} ms per layer and "
          f"step ({solves} solves, {sum(sh['adapted'] for sh in shares)} moved off the plan's shares, "
          f"{sum(sh['failures'] for sh in shares)} failures)")
    tokens, busy = np.concatenate([f[0] for f in fit]), np.concatenate([f[1] for f in fit])
    slope, intercept = np.polyfit(tokens, busy, 1)
    print(f"straggler busy time ~ {intercept * 1e3:.1f} ms + {slope * 1e6:.1f} us x its tokens (all layers; "
          f"least squares over {len(tokens)} steps): {intercept * 1e3:.1f} ms of each step does not depend on "
          f"balance (attention, dense layers, exchanges, routing)")
    committed = sum(st["committed"] for st in stats)
    per_plan = {k: 1e3 * sum(st[k] for st in stats) / max(committed, 1) for k in ("switch_s", "solve_s")}
    print(f"plans per live run: {committed / args.repeats:.1f} committed; rank 0's own switching work "
          f"(validate, post transfers, wait, commit): {per_plan['switch_s']:.1f} ms per plan; "
          f"solving (background thread): {per_plan['solve_s']:.1f} ms per plan")


def change_cost(series_list: list) -> dict:
    """A change step computes under the placement in force before it, so compare it with the step
    just before (same placement): the difference is what the change itself costs."""
    out = {"wall": [], "busy": []}
    for wall, busy, changed, _, _ in series_list:
        idx = np.array([i for i in np.flatnonzero(changed) if i > 0 and not changed[i - 1]], dtype=int)
        if len(idx):
            out["wall"].append(wall[idx] / wall[idx - 1])
            out["busy"].append(busy[idx] / busy[idx - 1])
    return {k: np.concatenate(v) for k, v in out.items() if v}


def print_change_costs(args, runs: dict) -> None:
    forced = f"forced random plans every {args.forced_every} steps, owners moved"
    for policy, what in (("dynamic", "planned changes"), ("random", forced)):
        cost = change_cost(runs[policy])
        for name in ("wall", "busy"):
            if name in cost:
                r = cost[name]
                print(f"plan-change step / step before ({name}, {what}): mean {r.mean():.2f}, median "
                      f"{np.median(r):.2f}, n={len(r)} (goal <= 1.10)")


def main() -> None:
    args = _args()
    runs, stats, shares, fit = collect(args)
    print_step_table(args, runs)
    print_overheads(args, stats, shares, fit)
    print_change_costs(args, runs)


if __name__ == "__main__":
    main()

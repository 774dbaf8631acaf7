"""Offline mode of the comparison: per re-plan, the best plan a large budget finds, its proven
bound, and how far greedy, EPLB and the online ILP are from that bound.

`flexmoe compare --offline-budget SECONDS` wraps the replay's planner (`offline_plan_fn`): at each
re-plan of the ILP policy, on the very inputs the online ILP got (predicted loads, placement in
force, interval), it also runs greedy and EPLB, then spends the budget in two lanes (`_search`):
1. the node-level relaxation (`planner.bounds.NodeRelaxation`), two stages, in a second process
   when there are workers for it (the last one then runs on until its incumbent's plans are due):
   a proven bound, and node structures (their incumbents);
2. meanwhile the plan search: `polish` on the policies' plans (owners re-picked, shares from the
   relaxation's LP), `planner.refine`'s local search (judged by the estimator itself) on the best
   plans, and each stage's incumbent made into device plans four ways
   (`planner.construct.from_nodes`, with owners spread, `planner.refine.realise` and
   `planner.layout`'s program per node), refined;
3. last, the CP-SAT ILP hinted with every plan known (it refines its own result);
and reports the best plan's objective, the best valid bound (the max of the cheap bounds and the
relaxation's), and every policy's distance to that bound (objective / bound - 1), in `info`
under `offline_*` keys that the replay copies into `replans.csv`.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import time

import numpy as np

from cost_models.estimator import a2a_latency, estimate
from planner import bounds
from planner.construct import from_nodes, spread_owners
from planner.layout import layout
from planner.refine import realise, refine
from planner.score import check_loads, finish, migration_s, objective, pick_owner

POLICIES = ("greedy", "eplb", "ilp")  # distances reported per re-plan
FIELDS = ["offline_best_s", "offline_bound_s", "offline_gap", "offline_best_from", "offline_relaxation",
          "offline_wall_s"] + [f"offline_{p}_gap" for p in POLICIES]
# Budget shares (of the instance's seconds). The node relaxation's stages: without the per-expert
# local cuts (often proved quickly), then with them, capped by the best plan known by then.
RELAX_STAGES = ((0.45, False), (0.4, True))
NODE_REFINE_SHARE = 0.04  # each device plan made from a node incumbent
LAYOUT_SHARE = 0.05  # each node incumbent's layout program (all nodes together)
REALISE_SHARE = LAYOUT_SHARE + 4 * NODE_REFINE_SHARE  # a node incumbent laid out and its four plans refined
REFINE_SHARE = 0.08  # each of the best plans refined while the relaxation runs
REFINE_TOP = 3  # that many before the first stage ends at least (hints for the ILP)
POLISH_SHARE = 0.03  # each plan polished (at most 5 s)
ILP_SHARE = 0.05  # kept for the hinted ILP at the end: the rest stops that much before the budget


def solve_instance(cluster, counts, current, interval: int, budget: float, workers: int = 2,
                   known: dict | None = None, seed: int = 0) -> dict:
    """Best plan and proven bound for one layer instance within about `budget` seconds.

    Two lanes: the node relaxation's stages (bounds, and node structures as incumbents) and the
    plan search (polish, local search, the node incumbents made into device plans, the hinted
    ILP). With `workers` >= 2 the relaxation runs in a second process beside the search, so both
    get the whole budget; with 1 (or inside a worker process) they take turns, each stage and
    search step at half its share. `known`: name -> (x, share, owner) plans already made (the
    online ILP's): scored, used as incumbents and hints. Returns objectives per policy, the
    best, the bound and the gaps."""
    from planner.baselines import eplb
    from planner.greedy import greedy
    from planner.ilp import ilp
    t0 = time.perf_counter()
    counts = check_loads(cluster, counts, current, interval)
    load = counts.sum(axis=0)
    plans = dict(known or {})
    gx, gs, go, _ = greedy(cluster, counts, current, interval=interval)
    plans["greedy"] = (gx, gs, go)
    ex, es = eplb(load, cluster.slots, cluster.node_of)
    plans["eplb"] = (ex, es, pick_owner(cluster, ex, es, current))
    obj = {k: objective(cluster, counts, *p, current, interval) for k, p in plans.items()}
    bound, status = _search(cluster, counts, current, interval, budget, workers, plans, obj, t0)
    left = max(budget - (time.perf_counter() - t0), 0.01)
    extra = [(k, *p) for k, p in plans.items() if k not in ("greedy", "eplb")]
    x, s, o, info = ilp(cluster, counts, current, time_budget=left, workers=workers, seed=seed, interval=interval,
                        extra_hints=extra)
    lp = finish(cluster, counts, x, s, o, current, interval, 0, info)
    plans["offline-ilp"] = (lp.replicas(), lp.shares(), lp.owner)
    obj["offline-ilp"] = lp.info["objective"]
    best_name = min(obj, key=obj.get)
    best = obj[best_name]
    bound = min(bound, best)
    out = {"offline_best_s": best, "offline_bound_s": bound, "offline_gap": best / bound - 1.0,
           "offline_best_from": best_name, "offline_relaxation": status,
           "offline_wall_s": time.perf_counter() - t0, "objectives": obj, "best_plan": plans[best_name]}
    for p in POLICIES:
        if p in obj:
            out[f"offline_{p}_gap"] = obj[p] / bound - 1.0
    return out


def _search(cluster, counts, current, interval, budget, workers, plans, obj, t0):
    """The two lanes of `solve_instance` until the ILP's share of the budget: plans and
    objectives land in `plans` and `obj`. (the best valid bound, the relaxation's status)"""
    bound, status = bounds.quick_bound(cluster, counts), "none"
    lanes = _Lanes(workers > 1 and cluster.num_nodes > 1 and not mp.current_process().daemon)
    end = t0 + (1 - ILP_SHARE) * budget

    def slot(share: float) -> float:
        """Seconds for a step of this share of the budget, none past `end`."""
        return max(0.0, min(lanes.scale * share * budget, end - time.perf_counter()))

    with lanes:
        job = None
        stages = list(RELAX_STAGES) if cluster.num_nodes > 1 else []
        for i in range(len(stages) + 1):
            sol = None
            if job is not None:  # the stage submitted last round: its bound and incumbent
                nb, sol, st = job.result()
                if nb > bound or status == "none":
                    bound, status = max(bound, nb), st
            job = None
            if i < len(stages):  # the next stage starts at once, the other lane never idles
                share, cuts = stages[i]
                seconds = _stage_seconds(slot(share), lanes.pool is not None and i == len(stages) - 1,
                                         end - time.perf_counter(), budget)
                job = lanes.submit(_relax, cluster, counts, current, interval, min(obj.values()), cuts, seconds)
            if sol is not None:
                _add_node_plans(cluster, counts, current, interval, sol, f"nodes{i - 1}", plans, obj,
                                slot, NODE_REFINE_SHARE)
            if i == 0:  # the policies' plans polished: candidates and hints; their own objectives stay
                for name in list(plans):
                    x, s, o, v = polish(cluster, counts, current, interval, *plans[name],
                                        seconds=min(slot(POLISH_SHARE), 5.0))
                    if v < obj[name] - 1e-12:
                        plans[name + "+polish"], obj[name + "+polish"] = (x, s, o), v
            if job is not None or i == len(stages):
                _refine_best(cluster, counts, current, interval, plans, obj, 1 if i else REFINE_TOP,
                             slot, REFINE_SHARE, until=job)
    return bound, status


def _stage_seconds(given: float, last_in_own_lane: bool, left: float, budget: float) -> float:
    """A relaxation stage's seconds: its share of the budget (`given`), or, for the last stage in a
    process of its own, whatever is `left` before the ILP's share less the time its incumbent takes
    to be made into device plans, if that is more: nothing follows it in its lane, and an earlier
    stage that proved its optimum early leaves it that time (on the real excerpt the last stage
    proved 1-1.2% more on four instances in 40 s than in its 24 s share)."""
    if last_in_own_lane:
        given = max(given, left - REALISE_SHARE * budget)
    return max(given, 0.01)


class _Lanes:
    """Where the relaxation's stages run: a second process (`scale` 1: both lanes get the whole
    budget) or inline when the result is asked for (`scale` 0.5: they take turns)."""

    def __init__(self, parallel: bool):
        self.pool, self.scale = None, 1.0 if parallel else 0.5
        if parallel:
            from concurrent.futures import ProcessPoolExecutor
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args) if self.pool is not None else _Inline(fn, args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class _Inline:
    """A future that runs its call when the result is asked for (the serial lane)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def done(self) -> bool:
        return False

    def result(self):
        return self.fn(*self.args)


def _relax(cluster, counts, current, interval, upper, cuts, seconds):
    """One node-relaxation stage (`planner.bounds.NodeRelaxation`): (bound, incumbent, status)."""
    rel = bounds.NodeRelaxation(cluster, counts, current, interval, upper=upper, local_cuts=cuts)
    return rel.solve(seconds)


def _refine_best(cluster, counts, current, interval, plans, obj, top: int, slot, share: float, until=None) -> None:
    """`planner.refine` (shares levelled inside nodes too) on the best plans not refined here
    yet (distinct placements), each for `slot(share)` seconds: `top` of them, and more while the
    future `until` (a relaxation stage in the other process) is not done. A refined plan joins
    `plans` and `obj` as "<name>+refine"."""
    done = {(plans[k][0].tobytes(), np.asarray(plans[k][2]).tobytes()) for k in plans if k.endswith("+refine")}
    for name in sorted((k for k in obj if not k.endswith("+refine")), key=obj.get):
        if (top <= 0 and (until is None or until.done() or isinstance(until, _Inline))) or slot(share) <= 0:
            break
        x, s, o = plans[name]
        key = (np.asarray(x, bool).tobytes(), np.asarray(o).tobytes())
        if key in done:
            continue
        done.add(key)
        top -= 1
        rx, v, _ = refine(cluster, counts, current, interval, x, s, o, seconds=slot(share), within_nodes=True)
        if v.objective < obj[name] - 1e-12:
            plans[name + "+refine"], obj[name + "+refine"] = (rx, v.share, v.owner), v.objective


def _add_node_plans(cluster, counts, current, interval, sol, name, plans, obj, slot, share: float):
    """A node solution (u, n, own, Y) made into device plans four ways (`construct.from_nodes`
    with its owners and with owners spread, `refine.realise`, laid out for the slow syncs to
    overlap, and `planner.layout`, each node's layout solved whole), each refined for
    `slot(share)` seconds with shares also levelled inside nodes; all join `plans` and `obj`
    (different starts end in quite different plans: the estimator picks)."""
    starts = {}
    made = from_nodes(cluster, counts, sol[3], sol[2])
    if made is not None:
        x, s, o = made
        base = estimate(cluster, counts, x, s).total
        starts[""], starts["/owners"] = (x, s, o), (x, s, spread_owners(cluster, x, base, o))
    paired = realise(cluster, counts, sol[1], sol[2], sol[3])
    if paired is not None:
        starts["/paired"] = paired
    seconds = slot(LAYOUT_SHARE)
    solved = layout(cluster, counts, sol[1], sol[2], sol[3], seconds=seconds) if seconds > 0 else None
    if solved is not None:
        starts["/layout"] = solved
    for tag, (x, s, o) in starts.items():
        rx, v, _ = refine(cluster, counts, current, interval, x, s, o, seconds=slot(share), within_nodes=True)
        plans[name + tag], obj[name + tag] = (rx, v.share, v.owner), v.objective


def offline_plan_fn(budget: float, workers: int = 2, base=None):
    """A replay `plan_fn`: the usual plan, and for the ILP policy's re-plans the offline solve on
    the same inputs, its numbers added to the plan's `info` (`offline_*`)."""
    if not budget > 0:
        from cost_models.files import InputError
        raise InputError(f"the offline budget must be positive seconds, got {budget}")
    if base is None:
        from planner.solve import plan_layer as base

    def plan_fn(cluster, counts, current, *, solver, **kw):
        lp = base(cluster, counts, current, solver=solver, **kw)
        if solver != "ilp":
            return lp
        found = solve_instance(cluster, counts, current, kw.get("interval", 50), budget, workers,
                               known={"ilp": (lp.replicas(), lp.shares(), lp.owner)}, seed=kw.get("seed", 0))
        lp.info.update({k: v for k, v in found.items() if k.startswith("offline_")})
        return lp
    return plan_fn


def summary(replans: list[dict]) -> dict | None:
    """Distribution of the distance to the offline bound per policy, over the re-plans that have it."""
    recs = [r for r in replans if r.get("offline_bound_s")]
    if not recs:
        return None
    out = {"replans": len(recs), "wall_s_mean": float(np.mean([r["offline_wall_s"] for r in recs]))}
    for p in ("offline",) + POLICIES:
        key = "offline_gap" if p == "offline" else f"offline_{p}_gap"
        g = np.array([r[key] for r in recs if r.get(key) is not None], dtype=float) * 100
        if len(g):
            out[p] = {"median": float(np.median(g)), "p90": float(np.percentile(g, 90)), "max": float(g.max()),
                      "reach": float(np.median(100.0 / (1 + g / 100)))}
    return out


def markdown(s: dict | None, budget: float) -> str:
    if not s:
        return ""
    lines = ["## Offline: distance to the proven optimum", "",
             f"Over {s['replans']} re-plans of the ILP policy, each instance (the online ILP's inputs) solved "
             f"again with {budget:g} s (mean wall {s['wall_s_mean']:.1f} s): the best plan found and a valid "
             "lower bound (the max of the compute, traffic and node-relaxation bounds, `planner/bounds.py`). "
             "Distance = objective / bound - 1: an upper bound on how far from the optimum a plan is.", "",
             "| plan | median | p90 | worst | median fraction of the bound reached |", "|---|---|---|---|---|"]
    names = {"offline": "offline best", "greedy": "greedy", "eplb": "EPLB", "ilp": "online ILP"}
    for p in ("offline",) + POLICIES:
        if p in s:
            v = s[p]
            lines.append(f"| {names[p]} | {v['median']:.1f}% | {v['p90']:.1f}% | {v['max']:.1f}% | "
                         f"{v['reach']:.1f}% |")
    lines += ["", "Per re-plan: `offline_*` columns of `replans.csv`.", ""]
    return "\n".join(lines)


def figure(replans: list[dict]) -> bytes | None:
    """Box plot of each policy's distance to the offline bound over all re-plans (any number of
    layers: one box per policy, not one line per layer)."""
    recs = [r for r in replans if r.get("offline_bound_s")]
    if not recs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data, labels = [], []
    for p, label in (("offline", "offline best"), ("ilp", "online ILP"), ("greedy", "greedy"), ("eplb", "EPLB")):
        key = "offline_gap" if p == "offline" else f"offline_{p}_gap"
        g = [100 * r[key] for r in recs if r.get(key) is not None]
        if g:
            data.append(g)
            labels.append(label)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.boxplot(data, whis=(5, 95), showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_ylabel("objective over proven bound - 1 (%)")
    ax.set_title(f"distance to the proven optimum, {len(recs)} layer re-plans")
    ax.grid(axis="y", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def polish(cluster, counts, current, interval: int, x, share, owner, seconds: float = 10.0):
    """Better shares and owners for a fixed placement, judged by the estimator: owners re-picked
    one expert at a time among its replicas, then the shares the relaxation's LP (free routing,
    `planner.bounds.Relaxation` with replicas and owners fixed) finds best. (x, share, owner, objective)."""
    t0 = time.perf_counter()
    x = np.asarray(x, bool)
    owner = np.asarray(owner).copy()
    best = objective(cluster, counts, x, share, owner, current, interval)
    for e in np.flatnonzero(x.sum(axis=1) > 1):
        for g in np.flatnonzero(x[e]):
            if g == owner[e] or time.perf_counter() - t0 > seconds / 2:
                continue
            trial = owner.copy()
            trial[e] = g
            v = objective(cluster, counts, x, share, trial, current, interval)
            if v < best - 1e-12:
                best, owner = v, trial
    rel = bounds.Relaxation(cluster, counts, current, interval, integer=False)
    for e in range(x.shape[0]):
        for g in range(x.shape[1]):
            rel.x[e][g].SetBounds(float(x[e, g]), float(x[e, g]))
            rel.o[e][g].SetBounds(float(owner[e] == g), float(owner[e] == g))
    s = rel.solver
    s.SetTimeLimit(int(max(seconds - (time.perf_counter() - t0), 0.1) * 1000))
    from ortools.linear_solver import pywraplp
    if s.Solve() == pywraplp.Solver.OPTIMAL:
        y = np.array([[max(v.solution_value(), 0.0) for v in row] for row in rel.y])
        from planner.score import clean_shares
        sh = clean_shares(x, y)
        v = objective(cluster, counts, x, sh, owner, current, interval)
        if v < best:
            return x, sh, owner, v
    return x, share, owner, best


def term_means(cluster, counts, x, share, owner, current, interval: int) -> dict:
    """A plan's step split by term, seconds per device averaged over the cluster (the keys of
    `planner.bounds.NodeRelaxation.terms`; `step`: the slowest device, as the objective has it)."""
    est = estimate(cluster, counts, x, share, owner)
    lat = a2a_latency(cluster)
    return {"compute": float(est.compute.mean()), "a2a": float((est.a2a - lat).mean()), "sync": float(est.sync.mean()),
            "latency": float(lat.mean()), "step": est.step_time,
            "migration": migration_s(cluster, current, x, owner, interval)}


def diagnose(cluster, counts, current, interval: int, budget: float, workers: int = 1) -> dict:
    """Where the gap lies: the offline best plan's terms beside those of the node relaxation's
    incumbent (solved with the best plan as `upper`). A term the relaxation charges much less
    than the plan pays is where either the bound is loose or the plans are weak."""
    found = solve_instance(cluster, counts, current, interval, budget / 2, workers)
    rel = bounds.NodeRelaxation(cluster, counts, current, interval, upper=found["offline_best_s"])
    bound, sol, status = rel.solve(0.4 * budget)
    same = bounds.NodeRelaxation(cluster, counts, current, interval)
    same.fix_to(*found["best_plan"])
    same_bound, same_sol, _ = same.solve(0.1 * budget)
    return {"best_s": found["offline_best_s"], "best_from": found["offline_best_from"],
            "bound_s": max(bound, found["offline_bound_s"]), "relaxation_status": status,
            "plan": term_means(cluster, counts, *found["best_plan"], current, interval), "best_plan": found["best_plan"],
            "relaxation": rel.terms() if sol is not None else None,
            "plan_structure_s": same_bound, "plan_structure": same.terms() if same_sol is not None else None}


def main(argv=None):
    """Term-by-term diagnosis of a few instances of the real excerpt (`experiments.bench_planner`'s)."""
    import argparse

    from cost_models.presets import preset
    from experiments.bench_planner import SMARTMOE, smartmoe
    from planner.plan import static_layer
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("instances", type=int, nargs="+")
    ap.add_argument("--budget", type=float, default=40.0, help="seconds per instance (half plans, half bound)")
    args = ap.parse_args(argv)
    if not args.budget > 0:
        ap.error(f"--budget must be a positive number of seconds, got {args.budget}")
    cluster = preset("dgx-a100-2x8", slots=3)
    loads = smartmoe(False)
    if not loads:
        ap.error(f"no trace excerpt at {SMARTMOE} (set FLEXMOE_TRACES to the folder that holds it)")
    bad = [i for i in args.instances if not 0 <= i < len(loads)]
    if bad:
        ap.error(f"instances must be in 0..{len(loads) - 1}, got {bad}")
    print("ms per device (mean): best plan / node model on the plan's structure / relaxation's incumbent")
    for i in args.instances:
        counts = loads[i]
        d = diagnose(cluster, counts, static_layer(counts.shape[1], cluster.slots), 50, args.budget)
        r, f = d["relaxation"] or {}, d["plan_structure"] or {}
        nan = float("nan")
        cols = " ".join(f"{k} {d['plan'][k] * 1e3:.2f}/{f.get(k, nan) * 1e3:.2f}/{r.get(k, nan) * 1e3:.2f}"
                        for k in d["plan"])
        print(f"inst {i}: best {d['best_s'] * 1e3:.3f} ({d['best_from']}), node model on its structure "
              f"{d['plan_structure_s'] * 1e3:.3f}, bound {d['bound_s'] * 1e3:.3f} gap "
              f"{(d['best_s'] / d['bound_s'] - 1) * 100:.1f}% [{d['relaxation_status']}]\n    {cols}", flush=True)


if __name__ == "__main__":
    main()

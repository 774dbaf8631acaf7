"""Replay simulator: run a placement policy over a recorded trace, planning from the past only.

At trace step t a policy may look at the loads of steps < t and nothing else: the simulator hands
its predictor a *copy* of `counts[:t]` (the last `window` steps of it), plans each layer from the
prediction, and then scores step t on the loads that really came, with the estimator, under the
plan in force. That is the order a live system works in (loads are known only after routing), so
a policy cannot look better here than it could be in training.

Accounting, per trace step:
- layer times come from `cost_models.estimator.estimate`; the step time is their sum over layers;
- a plan change pays `migration_time` for everything it moves (all layers' transfers applied
  together) once, at the step where the new plan takes effect. A trace step may stand for
  `stride` training iterations (a trace sampled every 10th iteration has stride 10), so the
  sampled step is charged `migration_s / stride`: the mean step time is then the mean time per
  training iteration, and a plan kept for `interval` trace steps amortises its migration over
  `interval * stride` iterations, which is also the interval the planner is told;
- the capacity-factor policy (static placement) drops, per source, the tokens over each expert's
  capacity (`planner.baselines.drop_over_capacity`); they are not computed and are counted;
- planner wall-clock time is measured and reported but *not* added to step time: planning runs in
  a background thread, off the critical path.

The first plan of every policy is static expert parallelism: nothing is known before step 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import estimate, migration_time, migration_transfers
from cost_models.files import InputError
from planner.plan import LayerPlan, static_layer
from planner.solve import PREDICTORS
from planner.solvers import SOLVERS
from planner.step_shares import DISPATCH_MODES, ShareRule
from planner.trace import Trace

# Policies that are another policy's placement under a fixed dispatch: LPLB is EPLB's placement with
# per-step LP shares (DeepSeek LPLB, SGLang's `lp` dispatch).
PLACEMENT_OF = {"lplb": "eplb"}
# Every registered solver, each followed by the policies built on its placement (report order).
POLICIES = tuple(p for s in SOLVERS for p in (s, *(d for d, base in PLACEMENT_OF.items() if base == s)))
# Policies that keep the static placement for the whole run (capacity only drops tokens).
FIXED = ("static", "capacity")


@dataclass(frozen=True)
class Policy:
    """A placement policy and when and from what it re-plans.

    `interval`: re-plan every this many trace steps (0: never on a schedule). `trigger`: also
    re-plan when the balance ratio observed at the previous step exceeds it (None: off).
    `reference`: a second solver run on the very same inputs at each re-plan, recorded but not
    applied, so that a heuristic can be compared with the optimum re-plan by re-plan.
    """

    name: str
    solver: str
    interval: int = 5
    trigger: float | None = None
    predictor: str = "last"
    window: int = 5
    ema: float = 0.5
    time_budget: float = 1.0
    workers: int = 1
    seed: int = 0
    capacity_factor: float = 1.25
    reference: str | None = None
    dispatch: str = "adaptive"  # "adaptive": shares re-solved from each step's counts; "plan": the plan's

    def check(self) -> "Policy":
        if self.solver not in POLICIES:
            raise InputError(f"unknown policy {self.solver!r}; choose from {', '.join(POLICIES)}")
        if self.dispatch not in DISPATCH_MODES:
            raise InputError(f"unknown dispatch {self.dispatch!r}; choose from {', '.join(DISPATCH_MODES)}")
        if self.interval < 0:
            raise InputError(f"the re-plan interval must be >= 0 trace steps, got {self.interval}")
        if self.trigger is not None and not self.trigger >= 1.0:
            raise InputError(f"the balance trigger must be >= 1.0, got {self.trigger}")
        if self.predictor not in PREDICTORS:
            raise InputError(f"unknown predictor {self.predictor!r}; choose from {', '.join(PREDICTORS)}")
        if not 0 < self.ema <= 1:
            raise InputError(f"the EMA weight must be in (0, 1], got {self.ema}")
        if self.window < 1:
            raise InputError(f"the predictor window must be >= 1 step, got {self.window}")
        if self.solver == "capacity" and not self.capacity_factor > 0:
            raise InputError(f"the capacity factor must be > 0, got {self.capacity_factor}")
        if not 0 < self.time_budget <= 86400:  # NaN fails too
            raise InputError(f"the time budget must be in (0, 86400] seconds, got {self.time_budget}")
        return self

    @property
    def replans(self) -> bool:
        return self.solver not in FIXED and (self.interval > 0 or self.trigger is not None)


@dataclass
class ReplayResult:
    """Per-step series of one policy's replay and a record of each re-plan."""

    policy: Policy
    step_ids: np.ndarray  # [T] training step of each trace step
    stride: int  # training iterations each trace step stands for
    layer_time: np.ndarray  # [T, L] estimated seconds of each layer (no migration)
    balance: np.ndarray  # [T, L] max/mean tokens per device
    tokens: np.ndarray  # [T] token-slots routed
    dropped: np.ndarray  # [T] token-slots dropped (capacity policy)
    migration_s: np.ndarray  # [T] seconds of the plan change that took effect at this step
    migration_bytes: np.ndarray  # [T] bytes it moved
    replans: list[dict] = field(default_factory=list)

    @property
    def step_time(self) -> np.ndarray:
        """[T] seconds per training iteration at each trace step, migration charged per iteration."""
        return self.layer_time.sum(axis=1) + self.migration_s / self.stride

    @property
    def planner_time_s(self) -> float:
        return float(sum(r["wall_s"] for r in self.replans))

    def summary(self) -> dict:
        st = self.step_time
        return {"policy": self.policy.name, "solver": self.policy.solver, "dispatch": self.policy.dispatch,
                "mean_step_s": float(st.mean()),
                "mean_balance": float(self.balance.mean()), "worst_balance": float(self.balance.max()),
                "median_balance": float(np.median(self.balance)), "p90_balance": float(np.percentile(self.balance, 90)),
                "dropped_tokens": int(self.dropped.sum()),
                "dropped_pct": 100.0 * float(self.dropped.sum()) / max(float(self.tokens.sum()), 1.0),
                "migration_bytes": int(self.migration_bytes.sum()),
                "migration_s": float(self.migration_s.sum()),
                "replans": len({r["step"] for r in self.replans}),
                "planner_s": self.planner_time_s}


PlanFn = Callable[..., LayerPlan]
PredictFn = Callable[..., np.ndarray]


def _default_plan_fn() -> PlanFn:
    from planner.solve import plan_layer
    return plan_layer


def _default_predict_fn() -> PredictFn:
    from planner.solve import predict
    return predict


def replay(trace: Trace, cluster: Cluster, policy: Policy, *, plan_fn: PlanFn | None = None,
           predict_fn: PredictFn | None = None, stride: int | None = None,
           progress: bool = False) -> ReplayResult:
    """Replay `policy` over `trace` on `cluster` (see the module notes for the accounting).

    `plan_fn` (default `planner.solve.plan_layer`) and `predict_fn` (default
    `planner.solve.predict`) are injectable so tests can check what a policy is given.
    """
    policy.check()
    cluster.check_fits(trace.num_experts)
    stride = stride if stride is not None else trace_stride(trace)
    if stride < 1:
        raise InputError(f"the trace stride must be >= 1 iteration per step, got {stride}")
    plan_fn = plan_fn or (_default_plan_fn() if policy.replans else None)
    predict_fn = predict_fn or (_default_predict_fn() if policy.replans else None)
    drop = None
    if policy.solver == "capacity":
        from planner.baselines import drop_over_capacity as drop
    steps, layers = trace.num_steps, trace.num_layers
    interval_iters = max(policy.interval, 1) * stride
    # Step t's shares come from step t's counts: the runtime has them before it dispatches.
    shares = ShareRule(cluster, "plan" if drop is not None else policy.dispatch)

    plans = [static_layer(trace.num_experts, cluster.slots, int(lid)) for lid in trace.layer_ids]
    mats = [(p.replicas(), p.shares(), p.owner) for p in plans]
    out = ReplayResult(policy, trace.step_ids.copy(), stride, np.zeros((steps, layers)), np.ones((steps, layers)),
                       np.zeros(steps), np.zeros(steps, dtype=np.int64), np.zeros(steps),
                       np.zeros(steps, dtype=np.int64))
    bar = _bar(range(steps), progress, policy.name)
    for t in bar:
        if t > 0 and policy.replans and _due(policy, t, out.balance[t - 1]):
            # Only the past: a copy, so nothing downstream can even hold a view of later steps.
            history = np.array(trace.counts[max(0, t - policy.window):t], copy=True)
            plans, transfers = _replan(cluster, trace, policy, t, history, plans, plan_fn, predict_fn,
                                       interval_iters, out.replans)
            mats = [(p.replicas(), p.shares(), p.owner) for p in plans]
            if transfers:
                out.migration_s[t] = migration_time(cluster, transfers)
                out.migration_bytes[t] = sum(tr[4] for tr in transfers)
        for l in range(layers):
            x, share, owner = mats[l]
            counts = trace.counts[t, l]
            out.tokens[t] += counts.sum()
            if drop is not None:
                counts, dropped = drop(counts, x, share, policy.capacity_factor)  # per recorded source
                out.dropped[t] += int(dropped)
            est = estimate(cluster, counts, x, shares(counts, x, share, owner), owner)
            out.layer_time[t, l] = est.step_time
            out.balance[t, l] = est.balance
    return out


def _due(policy: Policy, t: int, last_balance: np.ndarray) -> bool:
    if policy.interval > 0 and t % policy.interval == 0:
        return True
    return policy.trigger is not None and float(last_balance.max()) > policy.trigger


def _replan(cluster, trace, policy, t, history, plans, plan_fn, predict_fn, interval_iters, log):
    """Plan every layer from `history` (steps before t); returns the new plans and the transfers."""
    start = time.perf_counter()
    predicted = predict_fn(history, policy.predictor, window=policy.window, ema=policy.ema)
    predict_s = time.perf_counter() - start
    new_plans, transfers = [], []
    kw = dict(time_budget=policy.time_budget, workers=policy.workers, seed=policy.seed, interval=interval_iters)
    for l, current in enumerate(plans):
        lid = int(trace.layer_ids[l])
        t0 = time.perf_counter()
        try:
            new = plan_fn(cluster, predicted[l], current, solver=PLACEMENT_OF.get(policy.solver, policy.solver),
                          layer_id=lid, **kw)
            new.validate(cluster.slots, f"layer {lid}")
            error = None
        except InputError as exc:  # a plan that fails validation leaves the current one in force
            new, error = current, str(exc)
        wall = time.perf_counter() - t0 + predict_s / len(plans)
        rec = {"policy": policy.name, "step": t, "step_id": int(trace.step_ids[t]), "layer": lid,
               "wall_s": wall, "error": error, **_info(new.info if error is None else {})}
        if policy.reference:
            t1 = time.perf_counter()
            ref = plan_fn(cluster, predicted[l], current, solver=policy.reference, layer_id=lid, **kw)
            rec.update({f"ref_{k}": v for k, v in _info(ref.info).items()})
            rec["ref_solver"] = policy.reference
            rec["ref_wall_s"] = time.perf_counter() - t1
        moved = migration_transfers(cluster, current.replicas(), current.owner, new.replicas(), new.owner)
        rec["migration_bytes"] = int(sum(tr[4] for tr in moved))
        transfers.extend(moved)
        new_plans.append(new)
        log.append(rec)
    return new_plans, transfers


INFO_KEYS = ("solver", "status", "objective", "step_time_s", "migration_s", "lower_bound", "proven_bound_s",
             "gap", "solve_time_s", "fallback", "balance")


def _info(info: dict) -> dict:
    # plus the offline mode's numbers when a plan carries them (experiments/offline.py)
    return {**{k: info.get(k) for k in INFO_KEYS}, **{k: v for k, v in info.items() if k.startswith("offline_")}}


def reference_replans(results: list[ReplayResult]) -> list[dict]:
    """The re-plans of the first policy that carries a reference solver (the ILP with greedy on the
    same inputs); with `--dispatch both` the ILP runs twice on the same plans, counted once."""
    for r in results:
        recs = [rec for rec in r.replans if rec.get("ref_objective") is not None]
        if recs:
            return recs
    return []


def trace_stride(trace: Trace) -> int:
    """Training iterations per trace step: the typical spacing of `step_ids` (1 if contiguous)."""
    if trace.num_steps < 2:
        return 1
    d = np.diff(trace.step_ids)
    return max(int(np.median(d)), 1) if (d > 0).all() else 1


def _bar(it, progress: bool, name: str):
    if not progress:
        return it
    from tqdm import tqdm
    # no monitor thread: a process running other threads does not fork (the ILP's spare workers
    # refine runner-up hints in forked processes, `planner.refine.ForkedRefines`)
    tqdm.monitor_interval = 0
    return tqdm(it, desc=f"replay {name}", unit="step", leave=False)

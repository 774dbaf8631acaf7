"""Per-step token shares over the replicas in place: a min-max LP solved for each step's counts.

A plan fixes where replicas live for many steps; how an expert's tokens split among them can
change every step for free, because every rank already all-gathers the step's `[sources,
experts]` counts before dispatch. Given those counts and the replicas `x[E, G]`, the shares here
minimise the slowest device's compute under its fitted model (heterogeneous devices count):

    minimise T   subject to   T >= a_g * replicas_g + b_g * sum_e y[e, g]   for every device g,
                              sum_g y[e, g] = tokens of e,   y >= 0,   y[e, g] = 0 where x[e, g] = 0

Only compute is modelled: linear stand-ins for the all-to-all (a node's cross traffic spread over
its ports, each replica's tokens beyond its own source's) made the estimator's step worse on the
real excerpt, since node-first routing lands a node's incoming tokens on the few replicas that take
them. So `ShareRule` lets the estimator judge: the LP's shares are dispatched only where the
estimator, all-to-all included, ranks them no slower than the plan's for the step's own counts.

The LP is built once per placement (`StepShares`, a GLOP request) and only its right-hand sides
change per step; each step is a fresh solve of that request, so equal inputs give bit-equal shares
on every rank, whatever was solved before. Experts with one replica have nothing to decide and
enter as constants: the LP has variables only for replicated experts, a few dozen at 256 experts.
"""

from __future__ import annotations

import math
import time

import numpy as np
from ortools.linear_solver import linear_solver_pb2, pywraplp

from cost_models.cluster import Cluster
from cost_models.estimator import estimate, fold_sources


class StepShares:
    """The per-step share LP for one placement `x[E, G]` on `cluster`.

    `solve(counts[S, E])` returns `share[E, G]` (each expert's row sums to 1 over its replicas; an
    expert with no tokens keeps its `fallback` row, by default even shares), or None if GLOP fails.
    """

    def __init__(self, cluster: Cluster, x: np.ndarray, fallback: np.ndarray | None = None):
        x = np.asarray(x, dtype=bool)
        self.x, self.b = x, cluster.compute_b
        reps = x.sum(axis=1)
        even = x / np.maximum(reps, 1)[:, None]
        self.fallback = even if fallback is None else np.asarray(fallback, dtype=np.float64)
        self.multi = np.flatnonzero(reps > 1)  # experts with a decision to make
        self.single = x & (reps == 1)[:, None]
        self.overhead = cluster.compute_a * x.sum(axis=0)
        self.cols = [np.flatnonzero(x[e]) for e in self.multi]  # devices of each y block
        self.request = _request(x, self.b, self.multi)
        self._makespan = float("nan")

    def solve(self, counts: np.ndarray) -> np.ndarray | None:
        x = self.x
        total = fold_sources(counts, x.shape[1]).sum(axis=0)  # [E]
        fixed = self.overhead + self.b * (self.single * total[:, None]).sum(axis=0)
        rows = self.request.model.constraint  # experts' rows first, then devices'
        for i, e in enumerate(self.multi):
            rows[i].lower_bound = rows[i].upper_bound = float(total[e])
        for g in range(x.shape[1]):
            rows[len(self.multi) + g].lower_bound = float(fixed[g])
        # A fresh solver per step: GLOP keeps state between solves of one model, and a degenerate
        # LP may then end on another optimal vertex; every rank must get the same shares.
        response = linear_solver_pb2.MPSolutionResponse()
        pywraplp.Solver.SolveWithProto(self.request, response)
        if response.status != linear_solver_pb2.MPSOLVER_OPTIMAL:
            return None
        values = np.maximum(np.asarray(response.variable_value), 0.0)
        self._makespan = float(values[0])
        share = self.fallback.copy()
        start = 1
        for e, cols in zip(self.multi, self.cols):
            vals = values[start:start + len(cols)]
            start += len(cols)
            if total[e] > 0 and vals.sum() > 0:
                share[e] = 0.0
                share[e, cols] = vals / vals.sum()
        return share

    def makespan(self) -> float:
        """The LP's optimal makespan of the last solve, seconds."""
        return self._makespan


def _request(x: np.ndarray, b: np.ndarray, multi: np.ndarray):
    """The LP as a GLOP request: variables T then y (expert by expert, devices in order);
    rows: one per replicated expert (sum of y = its tokens), then one per device
    (T - b_g * sum of y on g >= fixed seconds); right-hand sides are set per step."""
    model = linear_solver_pb2.MPModelProto()
    model.variable.add(lower_bound=0.0, upper_bound=math.inf, objective_coefficient=1.0)
    on_device = [[] for _ in range(x.shape[1])]
    for e in multi:
        row = model.constraint.add(lower_bound=0.0, upper_bound=0.0)
        for g in np.flatnonzero(x[e]):
            row.var_index.append(len(model.variable))
            row.coefficient.append(1.0)
            on_device[g].append(len(model.variable))
            model.variable.add(lower_bound=0.0, upper_bound=math.inf)
    for g, idx in enumerate(on_device):
        row = model.constraint.add(lower_bound=0.0, upper_bound=math.inf)
        row.var_index.extend([0] + idx)
        row.coefficient.extend([1.0] + [-float(b[g])] * len(idx))
    return linear_solver_pb2.MPModelRequest(
        model=model, solver_type=linear_solver_pb2.MPModelRequest.GLOP_LINEAR_PROGRAMMING)


DISPATCH_MODES = ("adaptive", "plan")
CACHE_SIZE = 256  # placements whose LP is kept: two plans of a 61-layer model, with room


class ShareRule:
    """Which shares a step dispatches with: `plan` (the plan's own) or `adaptive`: the LP above for
    the step's counts, kept only where the estimator (compute and the all-to-all under the one
    routing rule; replica sync is the same for both) ranks it no slower than the plan's shares for
    those same counts. The LP sees compute alone, and where tokens are dear to move (large hidden
    sizes, slow links) the plan's shares, which the planner chose with the traffic in view, can
    be faster. If the LP fails, the plan's shares are used and the run says so once.
    Keeps one `StepShares` per placement it has seen, so each LP is built once per plan."""

    def __init__(self, cluster: Cluster, mode: str = "adaptive", warn=None):
        if mode not in DISPATCH_MODES:
            raise ValueError(f"unknown dispatch mode {mode!r}; choose from {', '.join(DISPATCH_MODES)}")
        self.cluster, self.mode, self.warn = cluster, mode, warn
        # adapted: steps dispatched with the LP's shares; kept_plan: LP shares the estimator ranked slower
        self.solves = self.adapted = self.kept_plan = self.failures = 0
        self.seconds = 0.0  # spent deciding (LP and estimator)
        self._lps: dict[bytes, StepShares] = {}

    def __call__(self, counts: np.ndarray, x: np.ndarray, plan_share: np.ndarray,
                 owner: np.ndarray | None = None) -> np.ndarray:
        """Shares for `counts[S, E]` over replicas `x[E, G]`; `owner[E]` lets the estimator count
        replica sync (the same for both candidates, but it can change which device is slowest)."""
        if self.mode == "plan":
            return plan_share
        start = time.perf_counter()
        try:
            return self._decide(counts, np.asarray(x, dtype=bool), plan_share, owner)
        finally:
            self.seconds += time.perf_counter() - start

    def _decide(self, counts, x, plan_share, owner):
        key = x.tobytes() + bytes(str(x.shape), "ascii")
        lp = self._lps.get(key)
        if lp is None:
            if len(self._lps) >= CACHE_SIZE:
                self._lps.pop(next(iter(self._lps)))
            lp = self._lps[key] = StepShares(self.cluster, x)
        share = lp.solve(counts)
        self.solves += 1
        if share is None:
            self.failures += 1
            if self.failures == 1 and self.warn is not None:
                self.warn("per-step shares: the LP found no solution; dispatching with the plan's shares")
            return plan_share
        if np.abs(share - plan_share).max() <= 1e-9:
            return plan_share
        ours = estimate(self.cluster, counts, x, share, owner).step_time
        if ours > estimate(self.cluster, counts, x, plan_share, owner).step_time:
            self.kept_plan += 1
            return plan_share
        self.adapted += 1
        return share

    def stats(self) -> dict:
        return {"mode": self.mode, "solves": self.solves, "adapted": self.adapted, "kept_plan": self.kept_plan,
                "failures": self.failures, "seconds": self.seconds}

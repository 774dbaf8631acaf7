"""The solver registry: every placement policy the planner, the CLI and the runtime accept, by name.

A solver is `(cluster, counts[G, E], current, options) -> Placement`, `counts` already folded onto
the devices: `planner.solve.plan_layer` checks the inputs before calling it and scores its
placement with the estimator after, so a solver only searches. Adding one here adds it to
`flexmoe plan --solver`, `flexmoe train --solver`, `flexmoe compare --policies` and the runtime's
planner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from cost_models.cluster import Cluster
from cost_models.files import InputError
from planner import baselines
from planner.greedy import greedy_judged
from planner.plan import LayerPlan, static_layer
from planner.score import Verdict


class Placement(NamedTuple):
    """A solver's answer, before the estimator scores it (`planner.score.finish`).

    `x[E, G]` bool replicas; `share[E, G]` each replica's fraction of its expert's tokens (cleaned
    to sum to 1 later); `owner[E]` the device holding each expert's optimizer state, or None to
    let `planner.score.pick_owner` choose. `info` holds `solver` and `status`, and may hold
    `fallback` (bool), `bound_s` with `bound_valid` (a solver's own lower bound and whether it bounds
    the estimator's objective), and solver-specific keys; `finish` adds the estimator's numbers
    (the plan file's `info`, docs/CONTRACTS.md). `verdict`: the estimator's numbers where the solver
    already scored this very placement (greedy does, to pick it), so `finish` need not again."""

    x: np.ndarray
    share: np.ndarray
    owner: np.ndarray | None
    info: dict
    verdict: Verdict | None = None


@dataclass(frozen=True)
class SolveOptions:
    """What a solver may be told besides the loads: `time_budget` wall-clock seconds, ILP
    `workers` and `seed`, the re-plan `interval` migration is amortised over, and `reproducible`
    (the ILP on one worker and deterministic time)."""

    time_budget: float = 1.0
    workers: int = 1
    seed: int = 0
    interval: int = 50
    reproducible: bool = False


Solver = Callable[[Cluster, np.ndarray, "LayerPlan | None", SolveOptions], Placement]


def _static(cluster: Cluster, counts: np.ndarray, current, options: SolveOptions) -> Placement:
    lp = static_layer(counts.shape[1], cluster.slots)
    return Placement(lp.replicas(), lp.shares(), lp.owner, {"solver": "static", "status": "constructed"})


def _capacity(cluster: Cluster, counts: np.ndarray, current, options: SolveOptions) -> Placement:
    x, share, owner = _static(cluster, counts, current, options)[:3]
    factor = baselines.CAPACITY_FACTOR
    _, dropped = baselines.drop_over_capacity(counts, x, share, factor)
    return Placement(x, share, owner, {"solver": "capacity", "status": "constructed", "capacity_factor": factor,
                                       "dropped_tokens": int(dropped),
                                       "dropped_fraction": float(dropped / max(counts.sum(), 1))})


def _shadow(cluster: Cluster, counts: np.ndarray, current, options: SolveOptions) -> Placement:
    x, share, owner, n = baselines.shadow(cluster, counts, current, options.interval)
    return Placement(x, share, owner, {"solver": "shadow", "status": "constructed", "shadowed": n})


def _eplb(cluster: Cluster, counts: np.ndarray, current, options: SolveOptions) -> Placement:
    x, share = baselines.eplb(counts.sum(axis=0), cluster.slots, cluster.node_of)
    return Placement(x, share, None, {"solver": "eplb", "status": "constructed"})


def _greedy(cluster: Cluster, counts: np.ndarray, current, options: SolveOptions) -> Placement:
    return Placement(*greedy_judged(cluster, counts, current, interval=options.interval))


def _ilp(cluster: Cluster, counts: np.ndarray, current, options: SolveOptions) -> Placement:
    t0 = time.perf_counter()
    from planner.ilp import ilp  # here, not above: OR-Tools' CP-SAT is a slow import `flexmoe --help` skips
    # the first call in a process pays that import (about 0.25 s): it is part of the call's wall clock
    # (the reproducible mode's budget is the solver's deterministic time, not the clock's)
    budget = options.time_budget
    if not options.reproducible and options.time_budget > 0:
        budget = max(options.time_budget - (time.perf_counter() - t0), 1e-3)
    return Placement(*ilp(cluster, counts, current, time_budget=budget, workers=options.workers,
                          seed=options.seed, interval=options.interval, reproducible=options.reproducible))


# In report order: the baselines, then FlexMoE's own (greedy, the paper's; ilp, CP-SAT warm-started
# by the heuristics).
SOLVERS: dict[str, Solver] = {"static": _static, "capacity": _capacity, "shadow": _shadow, "eplb": _eplb,
                              "greedy": _greedy, "ilp": _ilp}


def check_solver(name: str) -> str:
    """`name` if it is a registered solver; otherwise a one-line InputError listing them."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise InputError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return name

"""Input checks and the estimator's verdict on a placement, shared by every solver.

Solvers search with their own cheap models; the numbers a plan reports always come from
`cost_models.estimator`, computed here, so that solvers are compared on one scale.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import (A2A_PHASES, Breakdown, a2a_latency, estimate, fold_sources, lower_bound,
                                   migration_seconds, node_replicas)
from cost_models.files import InputError
from cost_models.routing import class_traffic
from planner import bounds
from planner.plan import LayerPlan

EPS = 1e-12


def check_loads(cluster: Cluster, counts, current: LayerPlan | None, interval: int) -> np.ndarray:
    """`counts[S, E]` folded to `[G, E]` once loads, interval and current plan fit the cluster."""
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise InputError(f"loads must be 2-D [source, expert], got shape {counts.shape}")
    if 0 in counts.shape:
        raise InputError(f"loads are empty (shape {counts.shape})")
    if not np.issubdtype(counts.dtype, np.number) or not np.isfinite(counts).all() or (counts < 0).any():
        raise InputError("loads must be finite, non-negative token counts")
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
        raise InputError(f"the re-plan interval must be a whole number of steps >= 1, got {interval!r}")
    cluster.check_fits(counts.shape[1])
    if current is not None:
        if current.num_experts != counts.shape[1]:
            raise InputError(f"the current plan has {current.num_experts} experts, the loads {counts.shape[1]}")
        if current.num_devices != cluster.num_devices:
            raise InputError(f"the current plan has {current.num_devices} devices, the cluster "
                             f"{cluster.num_devices}")
        current.validate(cluster.slots, "current plan")
    return fold_sources(counts, cluster.num_devices)


def migration_s(cluster: Cluster, current: LayerPlan | None, x, owner, interval: int) -> float:
    """Seconds of migration per step, amortised over the steps the plan is expected to stay."""
    if current is None:
        return 0.0
    old_x, new_x = current.replicas(), np.asarray(x, bool)
    return migration_seconds(cluster, old_x, current.owner, new_x, np.asarray(owner)) / interval


class Verdict(NamedTuple):
    """The estimator's numbers for one placement with exactly these (cleaned) `share` and `owner`:
    a solver that already scored the plan it returns hands them to `finish`, which then does not
    estimate again."""

    share: np.ndarray
    owner: np.ndarray
    estimate: Breakdown
    migration_s: float

    @property
    def objective(self) -> float:
        return self.estimate.step_time + self.migration_s


def objective(cluster: Cluster, counts, x, share, owner, current, interval) -> float:
    """Estimated step time plus amortised migration: what every solver is judged by."""
    return verdict(cluster, counts, x, share, owner, current, interval).objective


def verdict(cluster: Cluster, counts, x, share, owner, current, interval, migration: float | None = None,
            sync: np.ndarray | None = None, traffic: np.ndarray | None = None) -> Verdict:
    """`objective`'s numbers, kept for `finish`; `migration` (`migration_s`) and `sync` (the
    estimate's sync seconds) of this `x` and `owner` if the caller has them already (neither
    depends on the shares), and `traffic`, `class_traffic`'s `[4, G]` of these shares (for
    `estimate`)."""
    if migration is None:
        migration = migration_s(cluster, current, x, owner, interval)
    return Verdict(share, owner, estimate(cluster, counts, x, share, owner, sync, traffic), migration)


def floor_terms(cluster: Cluster) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per device: all-to-all seconds per token sent or received inside the node and across, at
    its cheapest link of each class (0 where it has none), and its all-to-all latency."""
    ci, co = bounds.finite_class_costs(cluster)
    unit = A2A_PHASES * cluster.expert.token_bytes
    return unit * ci, unit * co, a2a_latency(cluster)


def device_floors(cluster: Cluster, counts, x, share, terms=None, traffic=None) -> np.ndarray:
    """Per device, a lower bound on its estimated step without the replica sync, from the tokens
    it sends and receives inside and across nodes (`routing.class_traffic`, O(E * G)) at its
    cheapest link of each class, with the estimate's own compute: with each device's sync added,
    equal to the estimate, up to rounding, where each link class has one bandwidth. `terms`:
    `floor_terms(cluster)`, and `traffic`: `class_traffic`'s (served, [4, G]), if the caller has
    them."""
    ci, co, lat = floor_terms(cluster) if terms is None else terms
    if traffic is None:
        traffic = class_traffic(fold_sources(counts, cluster.num_devices), share, cluster.node_index)
    tokens, (send_i, recv_i, send_o, recv_o) = traffic
    a2a = np.maximum(send_i, recv_i) * ci + np.maximum(send_o, recv_o) * co
    return cluster.compute_a * np.asarray(x, bool).sum(axis=0) + cluster.compute_b * tokens + a2a + lat


def pick_owner(cluster: Cluster, x: np.ndarray, share: np.ndarray, current: LayerPlan | None) -> np.ndarray:
    """Keep the current owner where it still holds a replica (moving optimizer state is the
    dearest transfer); otherwise the replica with the most replicas of its expert on its node
    (sync stays intra-node), then the largest share."""
    x = np.asarray(x, bool)
    owner = np.zeros(x.shape[0], dtype=np.int64)
    todo = np.ones(x.shape[0], dtype=bool)
    if current is not None:
        keep = x[np.arange(x.shape[0]), current.owner]
        owner[keep], todo = current.owner[keep], ~keep
    same = np.take(node_replicas(cluster, x), cluster.node_index, axis=1)  # replicas of each expert on each device's node
    key = np.where(x, same * 10.0 + share, -np.inf)
    owner[todo] = np.argmax(key[todo], axis=1)
    return owner


def even_shares(x: np.ndarray) -> np.ndarray:
    """1 / replicas on each replica, 0 elsewhere (a product: `where`'s numbers at half its cost)."""
    x = np.asarray(x, bool)
    r = x.sum(axis=1, keepdims=True)
    return x * (1.0 / np.maximum(r, 1))


def clean_shares(x: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Shares on replicas only, non-negative, summing to exactly 1 per expert (even if all zero)."""
    x = np.asarray(x, bool)
    share = np.asarray(share, dtype=np.float64)
    s = np.clip(share if np.isfinite(share).all() else np.nan_to_num(share), 0.0, None)  # a new array
    s *= x  # off replicas 0: `where(x, s, 0)` to the bit (s is finite and >= 0); in place, as below
    tot = s.sum(axis=1, keepdims=True)
    if (tot > EPS).all():  # the usual case: no expert needs even shares
        s /= tot
        return s
    return np.where(tot > EPS, s / np.maximum(tot, EPS), even_shares(x))


def finish(cluster: Cluster, counts, x, share, owner, current, interval, layer_id, info,
           known: Verdict | None = None) -> LayerPlan:
    """Turn a solver's matrices into a validated LayerPlan whose info holds the estimator's numbers.
    `known`: the solver's own verdict on this placement, used only where its shares and owner are
    exactly those the plan ends up with (cleaned), so the numbers are the same either way; a solver
    that hands the verdict's own shares (`share is known.share`, cleaned when it was made) spares
    cleaning and comparing them again."""
    t0 = time.perf_counter()
    x = np.asarray(x, bool)
    if known is None or share is not known.share:
        share = clean_shares(x, share)
    if owner is None:
        owner = pick_owner(cluster, x, share, current)
    if (known is not None and (share is known.share or np.array_equal(known.share, share))
            and np.array_equal(known.owner, owner)):
        est, mig = known.estimate, known.migration_s
    else:
        est, mig = estimate(cluster, counts, x, share, owner), migration_s(cluster, current, x, owner, interval)
    lb = lower_bound(cluster, counts)
    obj = est.step_time + mig
    info = dict(info)
    # the reported bound is the max of valid ones (planner/bounds.py); a solver's bound counts only
    # where the solver says it is valid for the estimator's objective (`bound_valid`): the ILP's
    # model fixes owners and linearises routing, so its bound is kept apart as `model_bound_s`
    model_bound = info.pop("bound_s", None)
    if model_bound is not None:
        info["model_bound_s"] = model_bound
    bound = max(lb, bounds.quick_bound(cluster, counts))
    if info.pop("bound_valid", False) and model_bound is not None:
        bound = max(bound, min(model_bound, obj))
    info.update(objective=obj, step_time_s=est.step_time, migration_s=mig, lower_bound=lb,
                gap=obj / bound - 1.0 if bound > 0 else 0.0, balance=est.balance, proven_bound_s=bound)
    info.setdefault("status", "heuristic")
    info.setdefault("fallback", False)
    info["solve_time_s"] = float(info.get("solve_time_s", 0.0)) + (time.perf_counter() - t0)
    lp = LayerPlan.from_matrices(x, share, owner, int(cluster.slots.max()), layer_id, info)
    lp.validate(cluster.slots, f"layer {layer_id}")
    return lp

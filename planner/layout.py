"""A node-level plan laid out on devices by a small mixed-integer program per node.

The node relaxation (`planner.bounds.NodeRelaxation`) decides, per expert and node, how many
replicas, which node owns the expert and how many tokens each node serves. Which device takes
which replica is left open, and it matters: a device holding a heavy replica of an expert served
on several nodes also pays a sync over the slow link, and an owner receives from all its remote
followers at once. The greedy layouts (`construct.from_nodes`, `refine.realise`) place one
replica at a time; here each node's layout is solved whole, the slowest device's time minimised:
replicas on devices (one per expert per device, the slots), owners among the owner node's
replicas, tokens per replica, each device's compute, sync (per link class the larger of what it
sends and receives) and all-to-all (what it sends of its own tokens and receives of others',
with the node's inter-node traffic, fixed by the node plan, split evenly). A node of 8 devices
with 20-odd experts solves in about a second. The all-to-all is approximate, so the result is a
start for `planner.refine`, which the estimator judges.
"""

from __future__ import annotations

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import A2A_PHASES, SYNC_PHASES, a2a_latency, fold_sources
from planner.bounds import finite_class_costs
from planner.construct import node_counts
from planner.score import clean_shares


def layout(cluster: Cluster, counts: np.ndarray, replicas: np.ndarray, owner_node: np.ndarray,
           tokens: np.ndarray, seconds: float = 5.0):
    """(x, share, owner) for `replicas[e, k]`, `owner_node[e]` and `tokens[e, k]` (per node), or
    None when a node's replicas do not fit or its program finds no layout within its share of
    `seconds`. The owner node holds at least one replica of each expert."""
    counts = fold_sources(counts, cluster.num_devices)
    load = counts.sum(axis=0)
    E = len(load)
    owner_node = np.asarray(owner_node, dtype=np.int64)
    n = node_counts(cluster, replicas, owner_node)
    if n is None:
        return None
    tokens = np.asarray(tokens, dtype=np.float64)
    x, tok, owner = np.zeros((E, cluster.num_devices), dtype=bool), np.zeros((E, cluster.num_devices)), np.full(E, -1)
    nodes = cluster.node_devices
    for k, devs in enumerate(nodes):
        placed = _node(cluster, counts, n, owner_node, tokens, k, seconds / len(nodes))
        if placed is None:
            return None
        ex, nx, ny, own = placed
        x[np.ix_(ex, devs)], tok[np.ix_(ex, devs)] = nx, ny
        mine = owner_node[ex] == k
        owner[ex[mine]] = devs[own[mine]]
    return x, clean_shares(x, tok / np.maximum(load[:, None], 1e-300)), owner


def _node(cluster: Cluster, counts, n, owner_node, tokens, k: int, seconds: float):
    """Node k's program: (experts on it, x [experts, devices], tokens, owner's device index or -1)."""
    from ortools.linear_solver import pywraplp
    devs = cluster.node_devices[k]
    ex = np.flatnonzero(n[:, k] > 0)
    m, E = len(devs), len(ex)
    nk, Y = n[ex, k], tokens[ex, k]
    mine = owner_node[ex] == k
    remote = n[ex].sum(axis=1) - nk  # followers on other nodes
    c = counts[np.ix_(devs, ex)]  # [devices, experts] own tokens
    tau = max(float(cluster.compute_b.max() * Y.sum()) / m, 1e-12) / 1000  # time unit: 1/1000 of a device's share
    a, b, lat = (np.asarray(v)[devs] / tau for v in (cluster.compute_a, cluster.compute_b, a2a_latency(cluster)))
    intra, inter = (float(v[devs].min()) for v in finite_class_costs(cluster))  # the node's cheapest links
    tb, P = cluster.expert.token_bytes, cluster.expert.param_bytes
    ki, ko = A2A_PHASES * tb * intra / tau, A2A_PHASES * tb * inter / tau
    pi, po = SYNC_PHASES * P * intra / tau, SYNC_PHASES * P * inter / tau
    demand = counts[devs].sum(axis=0)  # the node's demand for every expert
    out = float(np.maximum(demand - tokens[:, k], 0).sum()) / m  # inter-node traffic per device
    inn = float(np.maximum(tokens[:, k] - demand, 0).sum()) / m

    s = pywraplp.Solver.CreateSolver("SCIP")
    inf = s.infinity()
    x = [[s.BoolVar("") for _ in range(m)] for _ in range(E)]
    y = [[s.NumVar(0, float(Y[i]), "") for _ in range(m)] for i in range(E)]
    kept = [[s.NumVar(0, float(min(c[j, i], Y[i])), "") for j in range(m)] for i in range(E)]
    own = [[s.BoolVar("") for _ in range(m)] if mine[i] else None for i in range(E)]
    T = s.NumVar(0, inf, "T")
    for i in range(E):
        s.Add(sum(x[i]) == int(nk[i]))
        s.Add(sum(y[i]) == float(Y[i]))
        for j in range(m):
            s.Add(y[i][j] <= float(Y[i]) * x[i][j])
            s.Add(kept[i][j] <= y[i][j])
            s.Add(kept[i][j] <= float(c[j, i]) * x[i][j])
        if own[i] is not None:
            s.Add(sum(own[i]) == 1)
            for j in range(m):
                s.Add(own[i][j] <= x[i][j])
    for j, g in enumerate(devs):
        s.Add(sum(x[i][j] for i in range(E)) <= int(cluster.slots[g]))
        held = sum(x[i][j] for i in range(E))
        served = sum(y[i][j] for i in range(E))
        local = sum(kept[i][j] for i in range(E))
        a2a = s.NumVar(0, inf, "")
        s.Add(a2a >= ki * (float(counts[g].sum()) - local - out))  # sends of its own tokens
        s.Add(a2a >= ki * (served - local - inn))  # receives for its replicas
        # sync, per link class the larger of what it sends (as a follower) and receives (as an owner)
        hosted_i = sum(x[i][j] - own[i][j] for i in range(E) if mine[i])
        hosted_o = sum(x[i][j] for i in range(E) if not mine[i])
        owed_i = sum(int(nk[i] - 1) * own[i][j] for i in range(E) if mine[i])
        owed_o = sum(int(remote[i]) * own[i][j] for i in range(E) if mine[i] and remote[i])
        sync_i, sync_o = s.NumVar(0, inf, ""), s.NumVar(0, inf, "")
        s.Add(sync_i >= pi * hosted_i)
        s.Add(sync_i >= pi * owed_i)
        s.Add(sync_o >= po * hosted_o)
        s.Add(sync_o >= po * owed_o)
        s.Add(T >= float(lat[j]) + float(a[j]) * held + float(b[j]) * served + a2a + ko * max(out, inn)
              + sync_i + sync_o)
    s.Minimize(T)
    s.SetTimeLimit(int(max(seconds, 0.05) * 1000))
    if s.Solve() not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return None
    nx = np.array([[v.solution_value() > 0.5 for v in row] for row in x], dtype=bool)
    ny = np.where(nx, np.array([[max(v.solution_value(), 0.0) for v in row] for row in y]), 0.0)
    owner = np.array([int(np.argmax([v.solution_value() for v in o])) if o is not None else -1 for o in own])
    return ex, nx, ny, owner

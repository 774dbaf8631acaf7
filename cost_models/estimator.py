"""Step-time estimator for one MoE layer under a placement. numpy only: the planner calls it in loops.

A placement is given as matrices over [experts, devices]: `x` (replica present), `share`
(fraction of the expert's tokens that replica serves) and `owner[e]` (device with the optimizer
state). For device g in one training step:

- compute: sum over its replicas of `a_g + b_g * tokens` (forward plus backward);
- all-to-all: four phases (dispatch and combine, forward and backward); in each, a device's
  time on a link class is the larger of what it sends and what it receives over that class,
  bytes times seconds-per-byte, plus one latency per peer per phase;
- replica sync, two phases in sequence (the owner can only send fresh weights once it has the
  gradients): followers send gradients to owners, then owners send weights back; in each phase a
  device's time on a link class is the larger of what it sends and what it receives.

The layer's step time is the slowest device's total. Routing is hierarchical (`route`): a
source whose own device holds a replica of the expert keeps as many of its tokens there as that
replica's share allows; then its remaining tokens go to replicas on its own node, in proportion
to their spare capacity; only what the node cannot absorb crosses to other nodes, again in
proportion to spare capacity. Shares are untouched (a replica serves exactly share * tokens);
the rule only chooses who sends to whom, and it keeps tokens on the fast links because an
inter-node link is an order of magnitude slower than NVLink. With one node it is the plain
local-first rule. The runtime dispatches by the same rule, so estimate and reality agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cost_models.cluster import Cluster
from cost_models.files import InputError
from cost_models.routing import class_traffic, route

A2A_PHASES = 4
# Replica sync runs in two phases; a planner's per-pair sync term is this many replica transfers.
SYNC_PHASES = 2


@dataclass
class Breakdown:
    """Per-device seconds (arrays over devices) of one layer's step."""

    tokens: np.ndarray  # tokens computed on each device
    compute: np.ndarray
    a2a_send_intra: np.ndarray
    a2a_recv_intra: np.ndarray
    a2a_send_inter: np.ndarray
    a2a_recv_inter: np.ndarray
    a2a: np.ndarray  # what the all-to-all costs the device, latency included
    sync: np.ndarray
    total: np.ndarray

    @property
    def step_time(self) -> float:
        return float(self.total.max())

    @property
    def straggler(self) -> int:
        return int(self.total.argmax())

    @property
    def balance(self) -> float:
        """Max over mean tokens per device (1.0 is perfect)."""
        mean = self.tokens.mean()
        return float(self.tokens.max() / mean) if mean > 0 else 1.0

    def summary(self) -> dict:
        g = self.straggler
        return {"step_time_s": self.step_time, "balance": self.balance, "straggler": g,
                "compute_s": float(self.compute[g]), "a2a_s": float(self.a2a[g]), "sync_s": float(self.sync[g])}


def fold_sources(counts: np.ndarray, num_devices: int) -> np.ndarray:
    """Map `counts[source, expert]` recorded on S sources onto G devices.

    Source s covers the interval [s/S, (s+1)/S) and device g covers [g/G, (g+1)/G); each source's
    tokens go to devices in proportion to the overlap. Identity when S == G; sums groups when G
    divides S; splits evenly when S divides G.
    """
    counts = np.asarray(counts, dtype=np.float64)
    s = counts.shape[0]
    if s == num_devices:
        return counts
    edges_s = np.arange(s + 1) / s
    edges_g = np.arange(num_devices + 1) / num_devices
    lo = np.maximum(edges_s[:-1, None], edges_g[None, :-1])
    hi = np.minimum(edges_s[1:, None], edges_g[None, 1:])
    weight = np.clip(hi - lo, 0, None) * s  # [S, G], rows sum to 1
    return weight.T @ counts


def cells(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.nonzero` of a 2-D array (row and column indices in row-major order), from the flat
    indices: the same arrays, several times faster (numpy builds 2-D ones cell by cell: ~60 against
    ~10 us for a [256, 64] placement)."""
    return np.divmod(np.flatnonzero(x), x.shape[1])


def node_replicas(cluster: Cluster, x: np.ndarray) -> np.ndarray:
    """[E, K] how many replicas of each expert each node holds (`x @ cluster.node_onehot`, whole
    numbers, so the same values), counted over the replicas: no [E, G] float copy of `x`."""
    e, g = cells(x)
    k = cluster.num_nodes
    return np.bincount(e * k + cluster.node_index[g], minlength=x.shape[0] * k).reshape(x.shape[0], k)


def port_time(cluster: Cluster, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Send and receive seconds per device and link class for a [src, dst] bytes matrix:
    (send_intra, recv_intra, send_inter, recv_inter). Split by class as a product with the
    cluster's inverse bandwidths per class: `where` to the bit (seconds are finite and >= 0)."""
    intra, inter = cluster.class_inv_beta
    t_intra, t_inter = nbytes * intra, nbytes * inter
    return t_intra.sum(axis=1), t_intra.sum(axis=0), t_inter.sum(axis=1), t_inter.sum(axis=0)


def sync_bytes(cluster: Cluster, x: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """[follower device, owner device] bytes of the gradient phase of replica sync (the weight
    phase is its transpose)."""
    x = np.asarray(x, dtype=bool)
    e, g = cells(x)
    follower = g != owner[e]  # replicas that are not the owner
    n = x.shape[1]
    # whole counts per (follower, owner) pair: the same numbers as a one-hot matrix product, at a
    # fraction of its cost (a layer has a few replicas per expert, not devices^2 of them)
    pairs = np.bincount(g[follower] * n + owner[e[follower]], minlength=n * n).reshape(n, n)
    return cluster.expert.param_bytes * pairs.astype(np.float64)


def estimate(cluster: Cluster, counts: np.ndarray, x: np.ndarray, share: np.ndarray,
             owner: np.ndarray | None = None, sync: np.ndarray | None = None,
             traffic: np.ndarray | None = None) -> Breakdown:
    """Per-device breakdown of one layer's step. `counts[source, expert]` (any number of sources),
    `x[e, g]` replicas, `share[e, g]` token shares, `owner[e]` (None: no replica sync cost).
    `sync`: `sync_seconds(cluster, x, owner)` if the caller has it (it does not depend on shares);
    `traffic`: `class_traffic(counts, share, cluster.node_index)[1]` if the caller has it (used on
    clusters with one bandwidth per link class)."""
    num_devices = cluster.num_devices
    x = np.asarray(x, dtype=bool)
    share = np.asarray(share, dtype=np.float64)
    if x.shape != share.shape or x.shape[1] != num_devices:
        raise InputError(f"placement has shape {x.shape} / shares {share.shape}, the cluster has {num_devices} devices")
    counts = fold_sources(counts, num_devices)
    if counts.shape[1] != x.shape[0]:
        raise InputError(f"loads have {counts.shape[1]} experts, the placement {x.shape[0]}")
    totals = counts.sum(axis=0)
    tokens_eg = totals[:, None] * share
    tokens = tokens_eg.sum(axis=0)
    compute = cluster.compute_a * x.sum(axis=0) + cluster.compute_b * tokens
    if cluster.uniform_inv_beta is not None:  # one bandwidth per link class: each device's totals suffice
        if traffic is None:
            traffic = class_traffic(counts, share, cluster.node_index)[1]
        ports, a2a = class_a2a_seconds(cluster, traffic)
    else:
        _, remote = route(counts, share, cluster.node_of)
        ports, a2a = a2a_seconds(cluster, remote)
    if sync is None:
        sync = np.zeros(num_devices) if owner is None else sync_seconds(cluster, x, np.asarray(owner))
    return Breakdown(tokens, compute, *ports, a2a, sync, compute + a2a + sync)


def a2a_latency(cluster: Cluster) -> np.ndarray:
    """Per-device all-to-all latency, seconds: one per peer per phase, whatever the placement."""
    return A2A_PHASES * cluster.alpha.sum(axis=1)


def a2a_seconds(cluster: Cluster, remote: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The all-to-all's cost per device for `remote[src, dst]` tokens: ((send intra, recv intra,
    send inter, recv inter) seconds over the four phases, total seconds with latency)."""
    a2a_bytes = cluster.expert.token_bytes * remote
    si, ri, so, ro = port_time(cluster, a2a_bytes)
    # Phases alternate direction (dispatch out, combine back), so each sees send and receive swapped.
    si2, ri2, so2, ro2 = port_time(cluster, a2a_bytes.T)
    half = A2A_PHASES / 2
    a2a = half * (np.maximum(si, ri) + np.maximum(si2, ri2) + np.maximum(so, ro) + np.maximum(so2, ro2)) + a2a_latency(cluster)
    return (half * (si + si2), half * (ri + ri2), half * (so + so2), half * (ro + ro2)), a2a


def class_a2a_seconds(cluster: Cluster, traffic: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """`a2a_seconds` on a cluster with one bandwidth per link class (`Cluster.uniform_inv_beta`),
    from each device's tokens sent and received inside and across nodes (`routing.class_traffic`'s
    `[4, G]`): the same numbers up to rounding, without the O(E * G^2) matrix (half an estimate's
    cost at 256 experts on 64 devices). Each phase sees send and receive swapped, so both
    directions' phases cost the larger of the two."""
    ci, co = cluster.uniform_inv_beta
    tb = cluster.expert.token_bytes
    si, ri, so, ro = tb * ci * traffic[0], tb * ci * traffic[1], tb * co * traffic[2], tb * co * traffic[3]
    half = A2A_PHASES / 2
    a2a = A2A_PHASES * (np.maximum(si, ri) + np.maximum(so, ro)) + a2a_latency(cluster)
    intra, inter = half * (si + ri), half * (so + ro)
    return (intra, intra.copy(), inter, inter.copy()), a2a


def sync_seconds(cluster: Cluster, x: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Replica synchronisation per device: gradients to owners, then weights back."""
    grads = sync_bytes(cluster, x, owner)
    sync = np.zeros(cluster.num_devices)
    for phase in (grads, grads.T):
        si, ri, so, ro = port_time(cluster, phase)
        sync += np.maximum(si, ri) + np.maximum(so, ro)
    return sync


def migration_transfers(cluster: Cluster, old_x: np.ndarray, old_owner: np.ndarray, new_x: np.ndarray,
                        new_owner: np.ndarray) -> list[tuple[int, int, int, str, int]]:
    """What a placement change moves: (expert, src, dst, 'weights' | 'optimizer', bytes).

    A new replica copies weights from an existing replica on its own node if there is one, else
    from the owner; a moved owner takes the optimizer state from the old owner.
    """
    es, src, dst, weights = _transfers(cluster, old_x, old_owner, new_x, new_owner)
    pb, ob = cluster.expert.param_bytes, cluster.expert.optimizer_bytes
    return [(e, s_, g, "weights", pb) if w else (e, s_, g, "optimizer", ob)
            for e, s_, g, w in zip(es.tolist(), src.tolist(), dst.tolist(), weights.tolist())]


def _transfers(cluster: Cluster, old_x, old_owner, new_x, new_owner):
    """`migration_transfers` as arrays (expert, src, dst, is-weights), in the same order."""
    old_x, new_x = np.asarray(old_x, bool), np.asarray(new_x, bool)
    old_owner, new_owner = np.asarray(old_owner), np.asarray(new_owner)
    es, gs = cells(new_x & ~old_x)
    # the first old holder on the new replica's node, else the old owner
    first = _first_on_node(cluster, old_x)
    src = first[es, cluster.node_index[gs]]
    src = np.where(src >= 0, src, old_owner[es])
    moved = np.flatnonzero(new_owner != old_owner)
    return (np.concatenate([es, moved]), np.concatenate([src, old_owner[moved]]).astype(np.int64),
            np.concatenate([gs, new_owner[moved]]).astype(np.int64),
            np.arange(len(es) + len(moved)) < len(es))


def _first_on_node(cluster: Cluster, x: np.ndarray) -> np.ndarray:
    """[E, K] the lowest device of each node holding a replica of each expert, -1 where none: from
    the replicas (O(replicas)), not an [transfers, G] comparison."""
    e, g = cells(x)
    k = cluster.num_nodes
    first = np.full(x.shape[0] * k, x.shape[1])
    np.minimum.at(first, e * k + cluster.node_index[g], g)
    first[first == x.shape[1]] = -1
    return first.reshape(x.shape[0], k)


def migration_time(cluster: Cluster, transfers: list[tuple[int, int, int, str, int]]) -> float:
    """Seconds to apply the transfers: the busiest device's send or receive over each link class,
    plus a latency per transfer it takes part in."""
    if not transfers:
        return 0.0
    src = np.fromiter((t[1] for t in transfers), dtype=np.int64, count=len(transfers))
    dst = np.fromiter((t[2] for t in transfers), dtype=np.int64, count=len(transfers))
    b = np.fromiter((t[4] for t in transfers), dtype=np.float64, count=len(transfers))
    return _transfer_seconds(cluster, src, dst, b)


def migration_seconds(cluster: Cluster, old_x: np.ndarray, old_owner: np.ndarray, new_x: np.ndarray,
                      new_owner: np.ndarray) -> float:
    """`migration_time` of `migration_transfers`, without building the list (the planners' loops)."""
    _, src, dst, weights = _transfers(cluster, old_x, old_owner, new_x, new_owner)
    if not len(src):
        return 0.0
    b = np.where(weights, float(cluster.expert.param_bytes), float(cluster.expert.optimizer_bytes))
    return _transfer_seconds(cluster, src, dst, b)


def _transfer_seconds(cluster: Cluster, src: np.ndarray, dst: np.ndarray, b: np.ndarray) -> float:
    n = cluster.num_devices
    # bincount, not np.add.at (several times slower): both add in the order given, the same sums
    nbytes = np.bincount(src * n + dst, weights=b, minlength=n * n).reshape(n, n)
    alpha = cluster.alpha[src, dst]
    latency = np.bincount(np.concatenate([src, dst]), weights=np.concatenate([alpha, alpha]), minlength=n)
    si, ri, so, ro = port_time(cluster, nbytes)
    return float((np.maximum(si, ri) + np.maximum(so, ro) + latency).max())


def compute_makespan(cluster: Cluster, counts: np.ndarray, x: np.ndarray, share: np.ndarray) -> float:
    """The slowest device's compute alone, seconds: what per-step shares minimise, and a lower
    bound on the estimated step of a placement with these shares."""
    x = np.asarray(x, dtype=bool)
    total = fold_sources(counts, x.shape[1]).sum(axis=0)
    tokens = (total[:, None] * share).sum(axis=0)
    return float((cluster.compute_a * x.sum(axis=0) + cluster.compute_b * tokens).max())


def lower_bound(cluster: Cluster, counts: np.ndarray) -> float:
    """Perfect balance, no communication: sum_g T/b_g >= tokens + (experts) * min_g a_g/b_g."""
    counts = np.asarray(counts, dtype=np.float64)
    tokens, experts = counts.sum(), counts.shape[1]
    a, b = cluster.compute_a, cluster.compute_b
    return float((tokens + experts * (a / b).min()) / (1.0 / b).sum())

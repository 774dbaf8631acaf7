"""The routing rule: which source sends how many tokens of which expert to which replica.

One rule serves the estimator (fractional tokens), the runtime (whole tokens), the replay and
the planners' final judgement, so estimated and real traffic agree by construction. Per expert,
with `demand[j] = total * share[j]` tokens for replica j:

1. a source that holds a replica keeps `min(count, demand)` of its tokens on it;
2. inside each node, `moved = min(what its sources still send, what its replicas still take)`
   moves between them, each source sending and each replica taking in proportion to its part;
3. what no node could absorb crosses nodes, spread over the spare capacity left, in proportion.

With one node step 2 is step 3 (plain local-first routing). Shares are never changed: a replica
serves exactly its demand. The whole-token version splits by largest remainder and fills what
rounding leaves by the north-west corner rule, so every source sends exactly its tokens and every
replica receives exactly its (rounded) demand.

`route_table` works vectorised over experts in a replica-compressed layout `[expert, source, j]`,
where j runs over the expert's replicas only (`replica_table`), so a placement with few replicas
per expert costs O(E * G * replicas), not O(E * G^2); it gives whole or fractional tokens.
`route` is the fractional rule in a factorised matrix form, for the estimator's inner loops; a
test pins it to `route_table(..., whole=False)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def dense_nodes(nodes) -> np.ndarray:
    """Node ids numbered 0..K-1 (a cluster file's ids may be any integers): `Cluster.node_index`
    for callers that hold only the node array."""
    n = np.asarray(nodes).reshape(-1)
    # already 0..K-1 with none missing (`node_index`, most cluster files): as they are, without
    # `unique`'s sort, a tenth of an estimate's cost at 64 devices
    if n.dtype.kind in "iu" and len(n) and n.min() >= 0 and np.bincount(n).all():
        return n.astype(np.intp, copy=False)
    return np.unique(n, return_inverse=True)[1].reshape(-1)


def apportion(total, weights: np.ndarray) -> np.ndarray:
    """Whole numbers summing to `total` in proportion to `weights`, by largest remainder (ties by
    index); rows at a time: `total[R]` with `weights[R, n]`, or a scalar with `weights[n]`."""
    w = np.asarray(weights, dtype=np.float64)
    one = w.ndim == 1
    w = np.atleast_2d(w)
    tot = np.asarray(total, dtype=np.int64).reshape(-1)
    s = w.sum(axis=1)
    ok = (s > 0) & (tot > 0)
    exact = np.where(ok[:, None], tot[:, None] * w / np.where(ok, s, 1.0)[:, None], 0.0)
    base = np.floor(exact).astype(np.int64)
    left = np.where(ok, tot - base.sum(axis=1), 0)
    order = np.argsort(-(exact - base), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(w.shape[1])[None, :].repeat(w.shape[0], 0), axis=1)
    base += rank < left[:, None]
    return base[0] if one else base


def replica_table(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`dev[E, J]` device of each expert's j-th replica in device order, -1 past its last;
    `valid[E, J]`) for replicas `x[E, G]`; J is the largest replica count."""
    x = np.asarray(x, dtype=bool)
    width = max(int(x.sum(axis=1).max(initial=0)), 1)
    order = np.argsort(~x, axis=1, kind="stable")[:, :width]
    valid = np.take_along_axis(x, order, axis=1)
    return np.where(valid, order, -1), valid


@dataclass
class Routing:
    """Tokens of expert e from source s to its j-th replica, `tokens[e, s, j]` on device `dev[e, j]`."""

    dev: np.ndarray  # [E, J] device ids, -1 padding
    tokens: np.ndarray  # [E, S, J]

    def dense(self) -> np.ndarray:
        """`flow[src, expert, dst]` (G = S devices)."""
        e_n, s_n, _ = self.tokens.shape
        flow = np.zeros((s_n, e_n, s_n), dtype=self.tokens.dtype)
        e, s, j = np.nonzero(self.tokens)
        flow[s, e, self.dev[e, j]] = self.tokens[e, s, j]
        return flow

    def sent_by(self, src: int) -> np.ndarray:
        """`[E, G]` tokens source `src` sends of each expert to each device (its own included)."""
        e_n, s_n, _ = self.tokens.shape
        out = np.zeros((e_n, s_n), dtype=self.tokens.dtype)
        e, j = np.nonzero(self.tokens[:, src, :])
        out[e, self.dev[e, j]] = self.tokens[e, src, j]
        return out

    def received_by(self, dst: int) -> np.ndarray:
        """`[S, E]` tokens device `dst` receives from each source of each expert."""
        hit = self.dev == dst  # [E, J]
        return np.einsum("esj,ej->se", self.tokens, hit.astype(self.tokens.dtype))

    def remote(self) -> np.ndarray:
        """`[src, dst]` tokens sent between different devices, all experts together."""
        return _remote(self.tokens, self.dev)


def _remote(tokens: np.ndarray, dev: np.ndarray) -> np.ndarray:
    e_n, s_n, j_n = tokens.shape
    cell = np.arange(s_n)[None, :, None] * s_n + dev[:, None, :]  # [E, S, J] index of (src, dst)
    cell = np.where(dev[:, None, :] >= 0, cell, s_n * s_n)  # padding goes to a bin cut off below
    out = np.bincount(cell.reshape(-1), weights=tokens.reshape(-1).astype(np.float64), minlength=s_n * s_n + 1)
    out = out[:s_n * s_n].reshape(s_n, s_n)
    np.fill_diagonal(out, 0.0)
    return out


def _split(total: np.ndarray, weights: np.ndarray, whole: bool) -> np.ndarray:
    """`total[R]` spread over `weights[R, n]` in proportion (whole tokens: largest remainder)."""
    if whole:
        return apportion(total, weights)
    s = weights.sum(axis=1, keepdims=True)
    return np.divide(total[:, None] * weights, s, out=np.zeros_like(weights, dtype=np.float64), where=s > 0)


def _transport(send: np.ndarray, recv: np.ndarray, whole: bool) -> np.ndarray:
    """`flow[R, S, J]` with row sums `send[R, S]` and column sums `recv[R, J]` (equal totals per
    R): proportional, `send * recv / total`; whole tokens: its floor, then what rounding left by
    the north-west corner rule (in source, then replica order)."""
    total = send.sum(axis=1)
    denom = np.where(total > 0, total, 1)[:, None, None]
    if not whole:
        return send[:, :, None] * recv[:, None, :] / denom
    f = (send[:, :, None] * recv[:, None, :]) // denom
    row = send - f.sum(axis=2)
    col = recv - f.sum(axis=1)
    r = np.concatenate([np.zeros((len(row), 1), row.dtype), np.cumsum(row, axis=1)], axis=1)
    c = np.concatenate([np.zeros((len(col), 1), col.dtype), np.cumsum(col, axis=1)], axis=1)
    lo = np.maximum(r[:, :-1, None], c[:, None, :-1])
    hi = np.minimum(r[:, 1:, None], c[:, None, 1:])
    return f + np.maximum(hi - lo, 0)


def route_table(counts: np.ndarray, x: np.ndarray, share: np.ndarray, nodes: np.ndarray | None = None,
                *, whole: bool = True) -> Routing:
    """Route `counts[source, expert]` (one source per device) to the replicas `x[E, G]` with token
    shares `share[E, G]`, by the module's rule. `nodes[g]` is each device's node (None: one node).
    `whole=True` routes whole tokens (counts must be integers), else fractional tokens."""
    dtype = np.int64 if whole else np.float64
    c = np.asarray(counts).T.astype(dtype)  # [E, S]
    x = np.asarray(x, dtype=bool) & (np.asarray(share) > 0)
    dev, valid = replica_table(x)
    tokens = np.zeros(c.shape + (dev.shape[1],), dtype=dtype)
    single = valid.sum(axis=1) <= 1  # one replica (or none, for an expert without tokens): all to it
    tokens[single, :, 0] = c[single] * valid[single, :1]
    multi = np.flatnonzero(~single)
    if len(multi):
        width = int(valid[multi].sum(axis=1).max())
        sub = _route_multi(c[multi], dev[multi, :width], valid[multi, :width], np.asarray(share, np.float64)[multi],
                           nodes, whole)
        tokens[multi, :, :width] = sub
    return Routing(dev, tokens)


def _route_multi(c, dev, valid, share, nodes, whole):
    """`tokens[E, S, J]` for experts with several replicas (see the module notes)."""
    num_src = c.shape[1]
    cols = np.where(valid, dev, 0)
    sh = np.where(valid, np.take_along_axis(share, cols, axis=1), 0.0)
    demand = _split(c.sum(axis=1), sh, whole)  # [E, J]
    # 1. own replica: where device s holds replica j of e, source s keeps min(count, demand)
    own = dev[:, None, :] == np.arange(num_src)[None, :, None]  # [E, S, J]
    tokens = np.where(own, np.minimum(c[:, :, None], demand[:, None, :]), 0).astype(c.dtype)
    rest = c - tokens.sum(axis=2)
    cap = demand - tokens.sum(axis=1)
    # 2. inside each node
    if nodes is not None:
        node = dense_nodes(nodes)
        rep_node = np.where(valid, node[cols], -1)
        for k in range(int(node.max()) + 1):
            src_in, rep_in = node == k, rep_node == k  # [S], [E, J]
            r_k = np.where(src_in[None, :], rest, 0)
            c_k = np.where(rep_in, cap, 0)
            moved = np.minimum(r_k.sum(axis=1), c_k.sum(axis=1))
            rows = np.flatnonzero(moved > 0)
            if not len(rows):
                continue
            send, recv = _split(moved[rows], r_k[rows], whole), _split(moved[rows], c_k[rows], whole)
            tokens[rows] += _transport(send, recv, whole)
            rest[rows] -= send
            cap[rows] -= recv
    # 3. what is left crosses nodes (with one node: all of it, local-first)
    rows = np.flatnonzero(rest.sum(axis=1) > 0)
    if len(rows):
        tokens[rows] += _transport(rest[rows], cap[rows], whole)
    return tokens


def _local_first(counts, share):
    """Stage 1 of the fractional rule: (`local[e, g]` kept on the own replica, `rest[e, g]` still to
    send, `cap[e, g]` still to take, `served[g]` the tokens each device's replicas serve). The
    counts are laid out `[E, G]` once (numpy is several times slower on arrays of mixed layouts),
    in a copy that becomes `rest`, and the demand becomes `cap`, in place: each fresh [E, G] array
    costs page faults."""
    counts = np.asarray(counts, dtype=np.float64)
    rest = np.array(counts.T, order="C")  # [E, G], always a copy: changed in place below
    share = np.asarray(share, dtype=np.float64)
    cap = counts.sum(axis=0)[:, None] * share  # the demand, until stage 1 takes the local part
    served = cap.sum(axis=0)
    local = np.minimum(rest, cap)
    rest -= local
    cap -= local
    return local, rest, cap, served


def _in_node(rest, cap, node):
    """Stage 2 per (expert, node): (`1 / m` with m the larger of what the node's sources send and
    its replicas take, 0 where both are 0; the node's rest and cap, and m, [E, K]). `min(rest, cap)`
    of the node moves, so each sender keeps `(m - cap) / m` of its rest for stage 3 and each replica
    `(m - rest) / m` of its capacity."""
    onehot = np.eye(int(node.max()) + 1)[node]  # [G, K]
    r_node, c_node = rest @ onehot, cap @ onehot  # [E, K]
    m_node = np.maximum(r_node, c_node)
    inv = np.divide(1.0, m_node, out=np.zeros_like(m_node), where=m_node > 0)
    return inv, r_node, c_node, m_node


def route(counts: np.ndarray, share: np.ndarray, nodes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rule in fractional tokens, as the estimator needs it: (`local[e, g]`, tokens source g
    keeps on its own replica; `remote[g, h]`, tokens g sends to h, all experts, zero diagonal).
    Replicas are where `share > 0`.

    Fractional splits are proportional, so each stage's transport factorises: what sources send
    times what replicas take over the total, summed over experts as one matrix product. That
    keeps this form O(E * G^2) matrix work with no per-cell arrays, several times faster than
    `route_table(..., whole=False)`, which gives the same numbers (a test pins the two)."""
    local, rest, cap, _ = _local_first(counts, share)  # 1. own replica
    # [E, G] products in place, into one scratch array: at large E each new one costs page faults
    tmp = np.empty_like(cap)
    if nodes is not None:  # 2. inside each node: min(rest, cap) of the node moves, in proportion
        node = dense_nodes(nodes)
        inv, r_node, c_node, m_node = _in_node(rest, cap, node)
        same = node[:, None] == node[None, :]
        # np.take, not [:, node]: that result is laid out column-major, slow in what follows
        tmp = np.take(inv, node, axis=1, out=tmp, mode="clip")
        remote = (np.multiply(tmp, rest, out=tmp).T @ cap) * same
        rest *= np.take((m_node - c_node) * inv, node, axis=1, out=tmp, mode="clip")  # the node could not absorb
        cap *= np.take((m_node - r_node) * inv, node, axis=1, out=tmp, mode="clip")  # its replicas still take
    else:
        remote = np.zeros((rest.shape[1], rest.shape[1]))
    total = cap.sum(axis=1, keepdims=True)  # 3. the rest crosses, over the spare capacity left
    remote += rest.T @ np.divide(cap, np.where(total > 0, total, 1.0), out=tmp)  # a row of 0 stays 0
    np.fill_diagonal(remote, 0.0)
    return local, remote


def class_traffic(counts: np.ndarray, share: np.ndarray, node: np.ndarray | None = None):
    """(`served[G]`, the tokens each device's replicas serve; `[4, G]` tokens each device sends and
    receives by the rule inside its node and across nodes: send intra, receive intra, send inter,
    receive inter), all experts together: `route`'s totals without the `[src, dst]` matrix (O(E * G)
    work). Exact: stage 2 never crosses nodes and, since per expert a node has either rest or
    capacity left after it, stage 3 always does (with `nodes` None, one node: all of it is intra).
    No device sends to itself (per expert a device has either rest or capacity after stage 1).
    `node`: each device's node numbered 0..K-1 (`Cluster.node_index`; None: one node)."""
    _, rest, cap, served = _local_first(counts, share)
    out = np.empty((4, rest.shape[1]))
    out[0], out[1] = rest.sum(axis=0), cap.sum(axis=0)
    if node is None:
        out[2:] = 0.0
    else:
        inv, r_node, c_node, m_node = _in_node(rest, cap, node)
        g = np.arange(len(node))
        # what crosses: sum_e v[e, g] * left[e, node(g)], the [G, K] product's entries at (g, node(g))
        out[2] = (rest.T @ ((m_node - c_node) * inv))[g, node]
        out[3] = (cap.T @ ((m_node - r_node) * inv))[g, node]
        out[:2] -= out[2:]
    return served, out


def route_tokens(counts: np.ndarray, share: np.ndarray, nodes: np.ndarray | None = None) -> np.ndarray:
    """The rule in whole tokens as a dense `flow[src, expert, dst]` (small cases and tests; the
    runtime uses `route_table`). Replicas are where `share > 0`."""
    share = np.asarray(share, dtype=np.float64)
    return route_table(counts, share > 0, share, nodes).dense()

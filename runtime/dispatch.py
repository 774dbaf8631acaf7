"""Token dispatch to expert replicas and back: all-to-all with uneven splits, autograd through it.

Every rank all-gathers the per-source expert counts of the layer (a [G, E] matrix, which the
monitor reuses), so each rank computes the same integer routing and knows both its send and its
receive splits without a second exchange. The routing is `cost_models.estimator.route` (local
replica first, up to its share) in whole tokens, so estimated and real traffic agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from cost_models.estimator import route


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Whole numbers summing to `total` in proportion to `weights` (largest remainder, ties by index)."""
    w = np.asarray(weights, dtype=np.float64)
    s = w.sum()
    if total == 0 or s <= 0:
        return np.zeros(len(w), dtype=np.int64)
    exact = total * w / s
    base = np.floor(exact).astype(np.int64)
    left = int(total - base.sum())
    if left:
        order = np.argsort(-(exact - base), kind="stable")
        base[order[:left]] += 1
    return base


def _transport(send: np.ndarray, recv: np.ndarray) -> np.ndarray:
    """Whole-token flows [source, replica] with row sums `send` and column sums `recv` (equal
    totals), each source spread over the replicas in proportion to what they still take."""
    f = np.zeros((len(send), len(recv)), dtype=np.int64)
    if recv.sum() == 0:
        return f
    f = np.floor(np.outer(send, recv) / recv.sum()).astype(np.int64)
    row, col = send - f.sum(1), recv - f.sum(0)
    for s in range(len(send)):  # hand out what rounding left, in device order
        g = 0
        while row[s] > 0:
            while col[g] == 0:
                g += 1
            k = min(row[s], col[g])
            f[s, g] += k
            row[s] -= k
            col[g] -= k
    return f


def route_tokens(counts: np.ndarray, share: np.ndarray, nodes: np.ndarray | None = None) -> np.ndarray:
    """`flow[src, expert, dst]` whole tokens: `cost_models.estimator.route`'s rule made integral.

    counts[src, expert] (one source per device), share[expert, device], nodes[device] (None: one
    node). Each replica serves its apportioned share of the expert's tokens; a source's own replica
    keeps its tokens first; then, inside each node, min(what its sources still send, what its
    replicas still take) moves between them; what is left crosses nodes, spread over the spare
    capacity. Every source sends exactly its tokens and every replica receives exactly its demand.
    """
    counts = np.asarray(counts, dtype=np.int64)
    num_dev, num_exp = counts.shape
    node = np.zeros(num_dev, dtype=np.int64) if nodes is None else np.asarray(nodes)
    groups = [np.flatnonzero(node == k) for k in np.unique(node)] if nodes is not None else []
    flow = np.zeros((num_dev, num_exp, num_dev), dtype=np.int64)
    for e in range(num_exp):
        c = counts[:, e]
        demand = apportion(int(c.sum()), share[e])
        local = np.minimum(c, demand)
        rest, cap = c - local, demand - local
        f = np.zeros((num_dev, num_dev), dtype=np.int64)
        for members in groups:  # inside each node first
            moved = int(min(rest[members].sum(), cap[members].sum()))
            if moved:
                send, recv = apportion(moved, rest[members]), apportion(moved, cap[members])
                f[np.ix_(members, members)] += _transport(send, recv)
                rest[members] -= send
                cap[members] -= recv
        f += _transport(rest, cap)
        f[np.arange(num_dev), np.arange(num_dev)] += local
        flow[:, e, :] = f
    return flow


def route_matches_estimator(counts: np.ndarray, share: np.ndarray, nodes: np.ndarray | None = None) -> float:
    """Largest per-link difference (tokens) between the integral routing and `route`; tests use it."""
    flow = route_tokens(counts, share, nodes)
    _, remote = route(counts, share, nodes)
    mine = flow.sum(axis=1).astype(np.float64)
    np.fill_diagonal(mine, 0.0)
    return float(np.abs(mine - remote).max())


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits, group)
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group = ctx.splits
        out = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), in_splits, out_splits, group=group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    if len(in_splits) == 1:
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group)


def gather_counts(local: torch.Tensor, world: int, group=None) -> np.ndarray:
    """[G, E] counts of every source, the same on all ranks."""
    if world == 1:
        return local.cpu().numpy()[None]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts).cpu().numpy()


def moe_apply(h: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, store, share: np.ndarray,
              rank: int, world: int, group=None, nodes: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Experts' weighted output for tokens `h[N, d]` with top-k `idx`/`gate[N, k]`, and the counts.

    Pairs (token, expert) are sorted by expert; each expert's pairs are cut into chunks by
    destination; the receiver regroups what it got by its slots, runs each slot once, and the
    reverse all-to-all brings results back to be gated and summed per token.
    """
    num_tokens, k = idx.shape
    num_exp = share.shape[0]
    flat_e = idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    local_counts = torch.bincount(flat_e, minlength=num_exp)
    counts = gather_counts(local_counts, world, group)
    flow = route_tokens(counts, share, nodes)
    mine = flow[rank]  # [E, G]
    seg_start = np.concatenate([[0], np.cumsum(counts[rank])[:-1]])
    cut = np.concatenate([np.zeros((num_exp, 1), np.int64), np.cumsum(mine, axis=1)], axis=1)  # [E, G+1]
    pieces = [np.arange(seg_start[e] + cut[e, g], seg_start[e] + cut[e, g + 1])
              for g in range(world) for e in range(num_exp) if mine[e, g]]
    pos = torch.from_numpy(np.concatenate(pieces) if pieces else np.zeros(0, np.int64)).to(h.device)
    send_pairs = order[pos]  # pair ids in send order: by destination, then expert
    send_tok = torch.div(send_pairs, k, rounding_mode="floor")
    in_splits = mine.sum(axis=0).tolist()
    out_splits = flow[:, :, rank].sum(axis=1).tolist()
    recv = all_to_all(h[send_tok], out_splits, in_splits, group)
    # Received blocks are [source][expert]; regroup by this rank's slots.
    got = flow[:, :, rank]  # [S, E]
    block = np.concatenate([[0], np.cumsum(got.reshape(-1))])  # start of (s, e) in recv
    outs, perm = [], []
    for slot, e in enumerate(store.experts):
        if e < 0:
            continue
        rows = [np.arange(block[s * num_exp + e], block[s * num_exp + e + 1]) for s in range(world)]
        rows = np.concatenate(rows)
        if len(rows) == 0:
            continue
        perm.append(rows)
        outs.append((slot, len(rows)))
    if sum(n for _, n in outs) != recv.shape[0]:
        raise RuntimeError("received tokens for an expert this rank does not hold: placement out of sync")
    if outs:
        perm_t = torch.from_numpy(np.concatenate(perm)).to(h.device)
        xs = recv[perm_t]
        ys, o = [], 0
        for slot, n in outs:
            ys.append(store.run(slot, xs[o:o + n]))
            o += n
        y = torch.cat(ys)
        y_recv = y[torch.argsort(perm_t)]
    else:
        y_recv = recv.new_zeros(recv.shape) * recv.sum()  # keeps the graph for the reverse exchange
    back = all_to_all(y_recv, in_splits, out_splits, group)
    w = gate.reshape(-1)[send_pairs].unsqueeze(1).to(back.dtype)
    out = torch.zeros_like(h).index_add(0, send_tok, back * w)
    return out, counts

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


def route_tokens(counts: np.ndarray, share: np.ndarray) -> np.ndarray:
    """`flow[src, expert, dst]` whole tokens: `route`'s local-first rule made integral.

    counts[src, expert] (one source per device), share[expert, device]. Each replica serves its
    apportioned share of the expert's tokens; the local replica keeps its source's tokens first;
    the rest are spread over the replicas' spare capacity in proportion, rounded so that every
    source sends exactly its tokens and every replica receives exactly its demand.
    """
    counts = np.asarray(counts, dtype=np.int64)
    num_dev, num_exp = counts.shape
    flow = np.zeros((num_dev, num_exp, num_dev), dtype=np.int64)
    for e in range(num_exp):
        c = counts[:, e]
        demand = apportion(int(c.sum()), share[e])
        local = np.minimum(c, demand)
        rest, cap = c - local, demand - local
        f = np.zeros((num_dev, num_dev), dtype=np.int64)
        if cap.sum() > 0:
            f = np.floor(np.outer(rest, cap) / cap.sum()).astype(np.int64)
            row, col = rest - f.sum(1), cap - f.sum(0)
            for s in range(num_dev):  # hand out what rounding left, in device order
                g = 0
                while row[s] > 0:
                    while col[g] == 0:
                        g += 1
                    k = min(row[s], col[g])
                    f[s, g] += k
                    row[s] -= k
                    col[g] -= k
        f[np.arange(num_dev), np.arange(num_dev)] += local
        flow[:, e, :] = f
    return flow


def route_matches_estimator(counts: np.ndarray, share: np.ndarray) -> float:
    """Largest per-link difference (tokens) between the integral routing and `route`; tests use it."""
    flow = route_tokens(counts, share)
    _, remote = route(counts, share)
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
              rank: int, world: int, group=None) -> tuple[torch.Tensor, np.ndarray]:
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
    flow = route_tokens(counts, share)
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

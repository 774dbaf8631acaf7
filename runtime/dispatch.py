"""Token dispatch to expert replicas and back: all-to-all with uneven splits, autograd through it.

Every rank all-gathers the per-source expert counts of the layer (a [G, E] matrix, which the
monitor reuses), so each rank computes the same shares (`planner.step_shares.ShareRule`: the
plan's, or re-solved for this step's counts) and the same whole-token routing
(`cost_models.routing`, the rule the estimator uses), and knows both its send and its receive
splits without a second exchange.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from cost_models.routing import route_table


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of `arange(s, s + n)` for each start and length, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, lengths) + np.arange(total)


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


def moe_apply(h: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, store, x: np.ndarray,
              share: np.ndarray, rank: int, world: int, group=None, nodes: np.ndarray | None = None,
              share_rule=None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Experts' weighted output for tokens `h[N, d]` with top-k `idx`/`gate[N, k]`, the counts
    `[S, E]` of every source, and the shares `[E, G]` this step dispatched with.

    `x[E, G]` are the replicas in place and `share[E, G]` the plan's shares; `share_rule(counts,
    x, share)` (None: the plan's) picks the shares this step dispatches with. Pairs (token,
    expert) are sorted by expert; each expert's pairs are cut into chunks by destination; the
    receiver regroups what it got by its slots, runs each slot once, and the reverse all-to-all
    brings results back to be gated and summed per token.
    """
    num_tokens, k = idx.shape
    num_exp = share.shape[0]
    flat_e = idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    local_counts = torch.bincount(flat_e, minlength=num_exp)
    counts = gather_counts(local_counts, world, group)
    step_share = share if share_rule is None else share_rule(counts, x, share)
    table = route_table(counts, x, step_share, nodes)
    mine = table.sent_by(rank)  # [E, G]
    got = table.received_by(rank)  # [S, E]
    # send: by destination, then expert; each expert's pairs are cut in destination order
    seg_start = np.cumsum(counts[rank]) - counts[rank]
    cut = np.cumsum(mine, axis=1) - mine  # [E, G] offset of each destination's chunk
    pos = _ranges((seg_start[:, None] + cut).T.reshape(-1), mine.T.reshape(-1))
    send_pairs = order[torch.from_numpy(pos).to(h.device)]
    send_tok = torch.div(send_pairs, k, rounding_mode="floor")
    in_splits = mine.sum(axis=0).tolist()
    out_splits = got.sum(axis=1).tolist()
    recv = all_to_all(h[send_tok], out_splits, in_splits, group)
    # received blocks are [source][expert]; regroup by this rank's slots, sources in order
    block = (np.cumsum(got.reshape(-1)) - got.reshape(-1)).reshape(got.shape)  # start of (s, e) in recv
    slots = [(slot, e) for slot, e in enumerate(store.experts) if e >= 0]
    slot_e = np.array([e for _, e in slots], dtype=np.int64)
    sizes = got[:, slot_e].sum(axis=0) if len(slots) else np.zeros(0, np.int64)
    if int(sizes.sum()) != recv.shape[0]:
        raise RuntimeError("received tokens for an expert this rank does not hold: placement out of sync")
    perm = _ranges(block[:, slot_e].T.reshape(-1), got[:, slot_e].T.reshape(-1))
    if len(perm):
        perm_t = torch.from_numpy(perm).to(h.device)
        xs = recv[perm_t]
        cuts = np.cumsum(sizes) - sizes
        y = torch.cat(store.run_slots([(slot, xs[o:o + n]) for (slot, _), o, n
                                       in zip(slots, cuts.tolist(), sizes.tolist()) if n]))
        y_recv = y[torch.argsort(perm_t)]
    else:
        y_recv = recv.new_zeros(recv.shape) * recv.sum()  # keeps the graph for the reverse exchange
    back = all_to_all(y_recv, in_splits, out_splits, group)
    w = gate.reshape(-1)[send_pairs].unsqueeze(1).to(back.dtype)
    out = torch.zeros_like(h).index_add(0, send_tok, back * w)
    return out, counts, step_share

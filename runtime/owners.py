"""Owners: every expert's optimizer state lives on one rank, its owner.

Per step, replicas send their gradients to the owner, the owner sums them, takes the AdamW step
and sends fresh weights back. All layers travel together: one all-to-all for gradients and one
for weights per step, whatever the number of layers and experts. A placement change rides the
same exchange: new replicas are just extra weight targets, and a moving owner's new home gets
the summed gradient to replay onto the moments it prefetched (see `runtime.replan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from planner.plan import Plan
from runtime.experts import ExpertSlots


@dataclass
class AdamW:
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0

    def moments(self, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
        """The moment update alone: a new owner replays it onto prefetched moments."""
        m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)

    def step(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, t: int) -> None:
        """torch.optim.AdamW's update on flat vectors (t counts from 1)."""
        p.mul_(1 - self.lr * self.weight_decay)
        self.moments(m, v, g)
        denom = (v / (1 - self.beta2 ** t)).sqrt_().add_(self.eps)
        p.addcdiv_(m, denom, value=-self.lr / (1 - self.beta1 ** t))


def exchange(send: list[torch.Tensor], sizes_in: list[int], world: int, group=None) -> list[torch.Tensor]:
    """One all-to-all of flat buffers: `send[h]` goes to rank h; returns what each rank sent here."""
    if world == 1:
        return [send[0]]
    out = torch.empty(sum(sizes_in), dtype=send[0].dtype, device=send[0].device)
    dist.all_to_all_single(out, torch.cat(send), sizes_in, [len(s) for s in send], group=group)
    return list(out.split(sizes_in))


class ExpertRuntime:
    """This rank's expert slots (per layer), its owned experts' moments, and the per-step exchange."""

    def __init__(self, plan: Plan, experts, rank: int, world: int, weights: torch.Tensor,
                 opt: AdamW, group=None, device=None):
        """`experts`: the expert template module (`nn.Module`), or one per layer, all with the same
        number of parameters; `weights[L, E, params]`: every expert's weights (the same on all ranks)."""
        self.plan, self.rank, self.world = plan, rank, world
        self.opt, self.group, self.device = opt, group, device
        L = len(plan.layers)
        templates = list(experts) if isinstance(experts, (list, tuple)) else [experts] * L
        if len(templates) != L:
            raise ValueError(f"{len(templates)} expert templates for {L} layers")
        self.stores = [self._store(templates[l], lp.assign[rank], lambda e, l=l: weights[l, e])
                       for l, lp in enumerate(plan.layers)]
        self.params = self.stores[0].params
        if any(s.params != self.params for s in self.stores) or weights.shape[-1] != self.params:
            raise ValueError("every layer's expert needs the same number of parameters as the weights given")
        self.moments: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {
            (l, int(e)): (torch.zeros(self.params, device=device), torch.zeros(self.params, device=device))
            for l, lp in enumerate(plan.layers) for e in np.flatnonzero(lp.owner == rank)}
        self.t = 0  # AdamW steps taken

    def _store(self, template, experts: np.ndarray, source) -> ExpertSlots:
        s = ExpertSlots(template, experts, self.device)
        for j, e in enumerate(s.experts):
            if e >= 0:
                s.load_flat(j, source(int(e)))
        return s

    def share(self, layer: int) -> np.ndarray:
        return self.plan.layers[layer].shares()

    def replicas(self, layer: int) -> np.ndarray:
        return self.plan.layers[layer].replicas()

    def zero_grad(self) -> None:
        for s in self.stores:
            s.zero_grad()

    # --- who sends what to whom: the same lists on every rank ---------------------------------
    def _lists(self, pick) -> list[list[list[tuple[int, int]]]]:
        """lists[src][dst] = [(layer, expert)] sorted, for every (src, dst) pair `pick` selects."""
        out = [[[] for _ in range(self.world)] for _ in range(self.world)]
        for l, lp in enumerate(self.plan.layers):
            for e, s, h in pick(l, lp):
                out[s][h].append((l, e))
        return out

    def step(self, pending=None) -> dict:
        """Gradients to owners, owners' AdamW step, weights back. `pending` (a staged placement
        change) adds its new replicas as weight targets and sends moving owners' summed gradients."""
        P, me, world = self.params, self.rank, self.world
        x = [lp.replicas() for lp in self.plan.layers]
        owner = [lp.owner for lp in self.plan.layers]
        grads_to = self._lists(lambda l, lp: [(e, g, owner[l][e]) for e, g in zip(*np.nonzero(x[l]))
                                              if g != owner[l][e]])
        send = [torch.cat([self.stores[l].grad_flat(self.stores[l].slot_of(e)) for l, e in grads_to[me][h]])
                if grads_to[me][h] else torch.zeros(0, device=self.device) for h in range(world)]
        recv = exchange(send, [len(grads_to[s][me]) * P for s in range(world)], world, self.group)
        summed: dict[tuple[int, int], torch.Tensor] = {}
        for key in sorted(self.moments):
            l, e = key
            summed[key] = self.stores[l].grad_flat(self.stores[l].slot_of(e)).clone()
        for s in range(world):
            for i, key in enumerate(grads_to[s][me]):
                summed[key] += recv[s][i * P:(i + 1) * P]
        self.t += 1
        for key in sorted(self.moments):
            l, e = key
            g = summed[key].div_(world)  # the data-parallel mean, as for dense parameters
            slot = self.stores[l].slot_of(e)
            p = self.stores[l].flat(slot)
            m, v = self.moments[key]
            self.opt.step(p, m, v, g, self.t)
            self.stores[l].load_flat(slot, p)
        # Weights back to replicas (and to a pending plan's new replicas), then moving owners' gradients.
        new_x = [lp.replicas() for lp in pending.plan.layers] if pending else x
        new_owner = [lp.owner for lp in pending.plan.layers] if pending else owner
        weights_to = self._lists(lambda l, lp: [(e, owner[l][e], g) for e, g in zip(*np.nonzero(x[l] | new_x[l]))
                                                if g != owner[l][e]])
        replay_to = self._lists(lambda l, lp: [(e, owner[l][e], new_owner[l][e]) for e in range(len(owner[l]))
                                               if new_owner[l][e] != owner[l][e]])
        send = []
        for h in range(world):
            parts = [self.stores[l].flat(self.stores[l].slot_of(e)) for l, e in weights_to[me][h]]
            parts += [summed[key] for key in replay_to[me][h]]
            send.append(torch.cat(parts) if parts else torch.zeros(0, device=self.device))
        sizes = [(len(weights_to[s][me]) + len(replay_to[s][me])) * P for s in range(world)]
        recv = exchange(send, sizes, world, self.group)
        staged, replay = {}, {}
        for s in range(world):
            n = len(weights_to[s][me])
            for i, (l, e) in enumerate(weights_to[s][me]):
                vec = recv[s][i * P:(i + 1) * P]
                slot = self.stores[l].slot_of(e)
                if slot >= 0:
                    self.stores[l].load_flat(slot, vec)
                else:
                    staged[(l, e)] = vec
            for i, key in enumerate(replay_to[s][me]):
                replay[key] = recv[s][(n + i) * P:(n + i + 1) * P]
        if pending is not None:
            pending.staged, pending.replay = staged, replay
        crossing = sum(len(lists[s][h]) for lists in (grads_to, weights_to, replay_to)
                       for s in range(world) for h in range(world))
        # floats this rank sent in the weight exchange; floats all ranks sent in both exchanges
        return {"grad_floats": sum(len(b) for b in send), "moved_floats": crossing * P}

    def commit(self, pending) -> None:
        """Switch to the pending plan at a step boundary: slots from local copies or staged weights,
        moments of newly owned experts from the prefetch plus the replayed gradient."""
        me = self.rank
        for l, lp in enumerate(pending.plan.layers):
            store, row = self.stores[l], lp.assign[me]
            changed = [j for j in range(len(row)) if row[j] != store.experts[j] and row[j] >= 0]
            # Only slots whose expert changes are written, in place; sources are read first because
            # a slot may be both a source and a target.
            src = {}
            for j in changed:
                i = store.slot_of(int(row[j]))
                if i >= 0:
                    src[j] = [t.detach()[i].clone() for t in store.tensors()]
                else:
                    src[j] = pending.staged[(l, int(row[j]))]
            for j in changed:
                if isinstance(src[j], list):
                    with torch.no_grad():
                        for t, v in zip(store.tensors(), src[j]):
                            t[j].copy_(v)
                else:
                    store.load_flat(j, src[j])
            store.experts = np.asarray(row, dtype=np.int64).copy()
        moments = {}
        for l, lp in enumerate(pending.plan.layers):
            for e in np.flatnonzero(lp.owner == me):
                key = (l, int(e))
                if key in self.moments:
                    moments[key] = self.moments[key]
                else:
                    m, v = pending.prefetched[key]
                    self.opt.moments(m, v, pending.replay[key])  # already the mean
                    moments[key] = (m, v)
        self.moments, self.plan = moments, pending.plan

    def full_state(self) -> torch.Tensor:
        """[3, L, E, params]: weights, first and second moments of every expert (all ranks get it)."""
        L, E = len(self.plan.layers), self.plan.num_experts
        out = torch.zeros(3, L, E, self.params, device=self.device)
        for (l, e), (m, v) in self.moments.items():
            out[0, l, e] = self.stores[l].flat(self.stores[l].slot_of(e))
            out[1, l, e], out[2, l, e] = m, v
        if self.world > 1:
            dist.all_reduce(out, group=self.group)
        return out

"""Expert slots: a rank's replicas of one layer's experts as stacked tensors.

Re-placement is a copy into a slot, never a new module, so the training loop keeps its shape.
An expert travels (gradient, weights, optimizer moments) as one flat vector of `params` numbers:
[w1 (d*f), b1 (f), w2 (f*d), b2 (d)].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def expert_params(d: int, f: int) -> int:
    return 2 * d * f + d + f


def init_experts(num_experts: int, d: int, f: int, generator: torch.Generator) -> torch.Tensor:
    """[E, params] initial weights of every expert, identical on all ranks (same generator)."""
    w1 = torch.randn(num_experts, d, f, generator=generator) / d ** 0.5
    w2 = torch.randn(num_experts, f, d, generator=generator) / f ** 0.5
    flat = torch.cat([w1.reshape(num_experts, -1), torch.zeros(num_experts, f),
                      w2.reshape(num_experts, -1), torch.zeros(num_experts, d)], dim=1)
    return flat


class SlotStore:
    """One layer's slots on this rank. `experts[j]` is the expert in slot j (EMPTY if unused)."""

    def __init__(self, d: int, f: int, experts: np.ndarray, device=None):
        self.d, self.f = d, f
        self.params = expert_params(d, f)
        self.experts = np.asarray(experts, dtype=np.int64)
        n = len(self.experts)
        self.w1 = torch.zeros(n, d, f, device=device).requires_grad_()
        self.b1 = torch.zeros(n, f, device=device).requires_grad_()
        self.w2 = torch.zeros(n, f, d, device=device).requires_grad_()
        self.b2 = torch.zeros(n, d, device=device).requires_grad_()

    def tensors(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2]

    def slot_of(self, expert: int) -> int:
        hit = np.flatnonzero(self.experts == expert)
        return int(hit[0]) if len(hit) else -1

    def flat(self, slot: int) -> torch.Tensor:
        return torch.cat([t.detach()[slot].reshape(-1) for t in self.tensors()])

    def grad_flat(self, slot: int) -> torch.Tensor:
        return torch.cat([(t.grad[slot] if t.grad is not None else torch.zeros_like(t[slot])).reshape(-1)
                          for t in self.tensors()])

    def load_flat(self, slot: int, vec: torch.Tensor) -> None:
        with torch.no_grad():
            o = 0
            for t in self.tensors():
                n = t[slot].numel()
                t[slot].copy_(vec[o:o + n].view_as(t[slot]))
                o += n

    def zero_grad(self) -> None:
        for t in self.tensors():
            t.grad = None

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The expert FFN (GELU) in one slot; autograd reaches the stacked weights."""
        return F.gelu(x @ self.w1[slot] + self.b1[slot]) @ self.w2[slot] + self.b2[slot]

"""Expert slots: a rank's replicas of one layer's experts as stacked tensors.

Re-placement is a copy into a slot, never a new module, so the training loop keeps its shape.
Any expert module works: `ExpertSlots` keeps one stacked tensor `[slots, *shape]` per parameter
of a template module and runs a slot with `torch.func.functional_call`, so autograd reaches the
stacked tensors. An expert travels (gradient, weights, optimizer moments) as one flat vector of
`params` numbers: its parameters flattened in `named_parameters()` order (the order of
`torch.nn.utils.parameters_to_vector`). The GPT of `flexmoe train` uses `GeluFFN`, whose vector is
[w1 (d*f), b1 (f), w2 (f*d), b2 (d)].
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


def expert_params(d: int, f: int) -> int:
    return 2 * d * f + d + f


def init_experts(num_experts: int, d: int, f: int, generator: torch.Generator) -> torch.Tensor:
    """[E, params] initial weights of every expert, identical on all ranks (same generator)."""
    w1 = torch.randn(num_experts, d, f, generator=generator) / d ** 0.5
    w2 = torch.randn(num_experts, f, d, generator=generator) / f ** 0.5
    flat = torch.cat([w1.reshape(num_experts, -1), torch.zeros(num_experts, f),
                      w2.reshape(num_experts, -1), torch.zeros(num_experts, d)], dim=1)
    return flat


class GeluFFN(nn.Module):
    """The GPT's expert: GELU(x w1 + b1) w2 + b2 (weights given by `init_experts`)."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(d, f))
        self.b1 = nn.Parameter(torch.zeros(f))
        self.w2 = nn.Parameter(torch.zeros(f, d))
        self.b2 = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return F.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


def flat_params(module: nn.Module) -> torch.Tensor:
    """One expert's parameters as the flat vector slots, owners and checkpoints use."""
    return torch.nn.utils.parameters_to_vector([p.detach() for p in module.parameters()])


class ExpertSlots:
    """One layer's slots on this rank. `experts[j]` is the expert in slot j (EMPTY if unused).

    `template` is one expert module; its own parameter values are never used (each slot's come
    from the stacked tensors), its buffers are."""

    def __init__(self, template: nn.Module, experts: np.ndarray, device=None):
        self.template = template.to(device) if device is not None else template
        named = list(self.template.named_parameters())
        if not named:
            raise ValueError("an expert module needs at least one parameter")
        self.names = [n for n, _ in named]
        self.experts = np.asarray(experts, dtype=np.int64)
        n = len(self.experts)
        self.stacked = [torch.zeros((n,) + tuple(p.shape), dtype=p.dtype, device=device).requires_grad_()
                        for _, p in named]
        self.params = sum(p.numel() for _, p in named)
        # Optional observer, called as on_run(slot, tokens) for every slot run (experiments count
        # the tokens each expert computed with it); None in training.
        self.on_run: Callable[[int, int], None] | None = None

    def tensors(self) -> list[torch.Tensor]:
        return self.stacked

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
        """The expert in one slot on tokens `x`; autograd reaches the stacked weights."""
        return self.run_slots([(slot, x)])[0]

    def run_slots(self, jobs: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Each `(slot, tokens)` job's expert output, in order. The slots' weights come from one
        `unbind` of each stacked tensor: backward then stacks the slots' gradients once, where
        indexing `t[slot]` per slot would zero-fill a whole-tensor gradient for every slot used."""
        views = [t.unbind(0) for t in self.stacked]
        out = []
        for slot, x in jobs:
            if self.on_run is not None:
                self.on_run(slot, x.shape[0])
            out.append(functional_call(self.template, {n: v[slot] for n, v in zip(self.names, views)}, (x,)))
        return out


class SlotStore(ExpertSlots):
    """Slots of `GeluFFN(d, f)` experts, with the stacked weights by name (`w1`, `b1`, `w2`, `b2`)."""

    def __init__(self, d: int, f: int, experts: np.ndarray, device=None):
        super().__init__(GeluFFN(d, f), experts, device)
        self.d, self.f = d, f
        self.w1, self.b1, self.w2, self.b2 = self.stacked

"""Replay a load shape through the real layer: `runtime.layer.FlexMoE` under `FlexMoERuntime`.

This is the path `flexmoe train` runs, driven the way SmartMoE's benchmark replays recorded gate
tables through its layer. For one case (counts `[source, expert]`, replicas, shares, owners):

- each rank builds top-1 expert ids whose bincount is its own row of the counts, so the layer's
  all-gather sees exactly the case's counts;
- the case's placement is the runtime's plan and `dispatch="plan"` keeps the case's shares, so the
  layer routes by the one rule (`cost_models.routing`) with the shares the estimator is given;
- one step is the trainer's protocol: `begin_step`, the layer's forward, backward from a fixed
  output gradient, `finish_step` (the loss and vote all-reduce, replicas' gradients to owners, the
  owners' AdamW, weights back).

The experts are the trainer's `GeluFFN`, wrapped so that their forward and backward are timed and
the tokens each expert computed are counted through `ExpertSlots.on_run` (what the validation's
test compares with the rule).
Runs inside a worker process; imports torch.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from cost_models.cluster import Cluster
from planner.plan import LayerPlan, Plan
from runtime.experts import GeluFFN, init_experts
from runtime.layer import FlexMoE, FlexMoERuntime

# Seconds per phase of one step on one rank. "experts fwd" is the part of "forward" spent inside
# the experts, "experts bwd" the part of "backward" from an expert's output gradient to its input's.
PHASES = ("forward", "backward", "owner step", "experts fwd", "experts bwd")
LR = 1e-4  # the owners' AdamW runs as in training; small, so the experts barely drift


def now(device: torch.device) -> float:
    """A timestamp after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Clock:
    """What the timed experts saw on this rank: seconds inside them and tokens per expert."""

    def __init__(self, num_experts: int, device: torch.device):
        self.device = device
        self.fwd = self.bwd = 0.0
        self.bwd_from = 0.0
        self.served = np.zeros(num_experts, dtype=np.int64)
        self.store = None  # the slots whose runs `count` sees (set by LayerReplay)

    def __deepcopy__(self, memo):
        return self  # FlexMoE deep-copies its template expert: the copy must report to this clock

    def count(self, slot: int, tokens: int) -> None:
        """`ExpertSlots.on_run`: the tokens the expert in `slot` computed."""
        self.served[self.store.experts[slot]] += tokens

    def reset(self) -> None:
        self.fwd = self.bwd = 0.0
        self.served[:] = 0


class _Mark(torch.autograd.Function):
    """Identity whose backward timestamps: at an expert's output it starts the expert's backward
    clock, at its input it stops it. Autograd on one thread runs an expert's nodes together, in
    reverse creation order, so each start is followed by its own stop."""

    @staticmethod
    def forward(ctx, x, clock, start):
        ctx.clock, ctx.start = clock, start
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        t = now(ctx.clock.device)
        if ctx.start:
            ctx.clock.bwd_from = t
        else:
            ctx.clock.bwd += t - ctx.clock.bwd_from
        return grad, None, None


class TimedExpert(nn.Module):
    """The trainer's expert (`GeluFFN`), timed and counted. Its parameters are `ffn.*` in the
    GeluFFN order, so `init_experts` vectors load into it unchanged."""

    def __init__(self, d: int, f: int, clock: _Clock):
        super().__init__()
        self.ffn = GeluFFN(d, f)
        self._clock = (clock,)  # a tuple: not state the runtime copies or checkpoints

    def forward(self, x):
        clock = self._clock[0]
        t0 = now(clock.device)
        y = self.ffn(_Mark.apply(x, clock, False))
        clock.fwd += now(clock.device) - t0
        return _Mark.apply(y, clock, True)


def case_plan(x: np.ndarray, share: np.ndarray, owner: np.ndarray | None) -> Plan:
    """The case's placement as a one-layer plan, as few slots as it needs; owners default to each
    expert's first replica."""
    x = np.asarray(x, dtype=bool)
    owner = np.argmax(x, axis=1) if owner is None else np.asarray(owner)
    slots = int(x.sum(axis=0).max())
    layer = LayerPlan.from_matrices(x, np.asarray(share, dtype=np.float64), owner, slots)
    return Plan(x.shape[0], np.full(x.shape[1], slots), [layer], {"solver": "validation case"}).validate()


def token_ids(counts_row: np.ndarray, seed: int) -> torch.Tensor:
    """Top-1 expert ids `[N, 1]` whose bincount is `counts_row`, in a shuffled order as a router's are."""
    ids = np.repeat(np.arange(len(counts_row)), counts_row)
    return torch.from_numpy(ids[np.random.default_rng(seed).permutation(len(ids))]).view(-1, 1)


class LayerReplay:
    """One case on this rank: the real layer and runtime, its tokens, and the timed step."""

    def __init__(self, rank: int, world: int, cluster: Cluster, case: dict, device: torch.device):
        counts = np.asarray(case["counts"], dtype=np.int64)  # [source, expert]
        num_experts, d, f = counts.shape[1], cluster.expert.hidden, cluster.expert.ffn
        self.device, self.clock = device, _Clock(num_experts, device)
        self.layer = FlexMoE(num_experts, d, lambda: TimedExpert(d, f, self.clock))
        weights = init_experts(num_experts, d, f, torch.Generator().manual_seed(0))[None]
        self.runtime = FlexMoERuntime([self.layer], rank=rank, world=world, device=device, lr=LR,
                                      plan=case_plan(case["x"], case["share"], case["owner"]), cluster=cluster,
                                      policy="static", dispatch="plan", weights=weights)
        self.clock.store = self.runtime.rt.stores[0]
        self.clock.store.on_run = self.clock.count
        gen = torch.Generator().manual_seed(100 + rank)
        idx = token_ids(counts[rank], seed=rank)
        self.idx = idx.to(device)
        self.h = torch.randn(len(idx), d, generator=gen).to(device).requires_grad_()
        self.gate = torch.ones(len(idx), 1, device=device, requires_grad=True)
        self.grad_out = torch.randn(len(idx), d, generator=gen).to(device)

    def step(self) -> list[float]:
        """One training step of the layer; this rank's seconds per phase, in `PHASES` order."""
        self.clock.reset()
        self.h.grad = self.gate.grad = None
        t0 = now(self.device)
        self.runtime.begin_step()
        out = self.layer(self.h, self.idx, self.gate)
        t1 = now(self.device)
        out.backward(self.grad_out)
        t2 = now(self.device)
        self.runtime.finish_step()
        t3 = now(self.device)
        return [t1 - t0, t2 - t1, t3 - t2, self.clock.fwd, self.clock.bwd]

    def seen(self) -> dict:
        """What the last step's layer saw: the counts it gathered `[S, E]`, the shares it dispatched
        with `[E, G]`, and the tokens this rank's experts computed `[E]`."""
        return {"counts": self.layer.last_counts.tolist(), "share": self.layer.last_share.tolist(),
                "served": self.clock.served.tolist()}

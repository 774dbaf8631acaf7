"""The per-step plan broadcast's wire format: one fixed-size float64 buffer, so every rank joins
the broadcast without a size exchange, whether or not a plan travels.

Layout: [has plan, sequence number, commit step], then per layer the slot assignment `[G, S]`,
the shares `[G, S]` and the owners `[E]`. Only numbers travel; decoding rounds ids back to whole
numbers, and every rank validates the decoded plan (`Plan.validate`) before using it.
"""

from __future__ import annotations

import numpy as np
import torch

from planner.plan import LayerPlan, Plan

HEADER = 3  # [has plan, sequence number, step at whose end it commits]


def encode(plan: Plan | None, seq: int, commit_step: int, layers: int, G: int, S: int, E: int) -> torch.Tensor:
    """A fixed-size float64 buffer, so the per-step broadcast needs no size exchange."""
    buf = torch.zeros(HEADER + layers * (2 * G * S + E), dtype=torch.float64)
    if plan is None:
        return buf
    buf[0], buf[1], buf[2] = 1, seq, commit_step
    parts = [np.concatenate([lp.assign.ravel(), lp.share.ravel(), lp.owner.ravel()]) for lp in plan.layers]
    buf[HEADER:] = torch.from_numpy(np.concatenate(parts).astype(np.float64))
    return buf


def decode(buf: torch.Tensor, slots: np.ndarray, layers: int, E: int) -> tuple[Plan | None, int, int]:
    """(plan or None, sequence number, commit step)."""
    if buf[0] == 0:
        return None, 0, 0
    G, S = len(slots), int(slots.max())
    arr = buf[HEADER:].numpy().reshape(layers, -1)
    lps = [LayerPlan(a[:G * S].reshape(G, S).round(), a[G * S:2 * G * S].reshape(G, S), a[2 * G * S:].round(), l)
           for l, a in enumerate(arr)]
    return Plan(E, slots, lps, {"source": "broadcast"}), int(buf[1]), int(buf[2])

"""The load monitor: per-layer expert counts by source, smoothed, and the balance they imply.

Dispatch already all-gathers each layer's [source, expert] counts, so every rank holds the same
numbers without another collective; the monitor only keeps them (for the trace) and smooths them.
"""

from __future__ import annotations

import numpy as np

from planner.plan import Plan


class Monitor:
    def __init__(self, ema: float = 0.5, record: bool = False):
        self.ema = ema
        self.smoothed: np.ndarray | None = None  # [L, S, E]
        self.record = record
        self.history: list[np.ndarray] = []
        self.steps: list[int] = []

    def update(self, step: int, counts: np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        if self.record:
            self.history.append(counts.copy())
            self.steps.append(step)
        c = counts.astype(np.float64)
        self.smoothed = c if self.smoothed is None else self.ema * c + (1 - self.ema) * self.smoothed


def device_tokens(counts: np.ndarray, shares: list[np.ndarray]) -> np.ndarray:
    """`[L, G]` tokens each device computes in each layer for `counts[L, S, E]` and per-layer shares."""
    return np.stack([(np.asarray(c).sum(axis=0)[:, None] * s).sum(axis=0) for c, s in zip(counts, shares)])


def worst_balance(tokens: np.ndarray) -> float:
    """Max over mean of `tokens[L, G]`, worst layer; 1.0 is perfect (and for a layer with no tokens)."""
    mean = tokens.mean(axis=1)
    ok = mean > 0
    return float(max(1.0, (tokens.max(axis=1)[ok] / mean[ok]).max(initial=1.0)))


def balance(counts: np.ndarray, plan: Plan, share_rule=None) -> float:
    """Max over mean tokens per device (worst layer; 1.0 is perfect) for `counts[L, S, E]` under
    `plan`, with the shares the dispatch would use: `share_rule(counts, x, share)` (None: the plan's)."""
    shares = [lp.shares() if share_rule is None else share_rule(counts[l], lp.replicas(), lp.shares(), lp.owner)
              for l, lp in enumerate(plan.layers)]
    return worst_balance(device_tokens(counts, shares))

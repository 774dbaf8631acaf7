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


def balance(counts: np.ndarray, plan: Plan) -> float:
    """Max over mean tokens per device under `plan` (worst layer); 1.0 is perfect."""
    worst = 1.0
    for l, lp in enumerate(plan.layers):
        tokens = (np.asarray(counts[l]).sum(axis=0)[:, None] * lp.shares()).sum(axis=0)
        if tokens.mean() > 0:
            worst = max(worst, float(tokens.max() / tokens.mean()))
    return worst

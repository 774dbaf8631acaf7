"""Least-squares fits of the cost models from measurements. numpy only.

Both models are affine: compute is `a + b*n` seconds for n tokens, a link is `alpha + bytes/beta`.
Measurements span orders of magnitude (1 KiB to 64 MiB, a few tokens to thousands), so the fit
minimises *relative* error (each sample weighted by 1/t): an ordinary fit would let the largest
samples decide everything and leave the intercept, which dominates small messages and cold
experts, essentially unmeasured. The intercept is constrained to be >= 0 (a negative latency
is noise, and the cluster format rejects it). Every fit keeps its samples and residuals so a
user can judge it; `r2` and the relative errors are computed on the original, unweighted scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cost_models.cluster import ComputeModel, Link
from cost_models.files import InputError


@dataclass(frozen=True)
class AffineFit:
    """`y = intercept + slope * x`, with what it was fitted on."""

    intercept: float
    slope: float
    x: np.ndarray
    y: np.ndarray
    method: str = "relative"  # which error was minimised: "relative" or "absolute" (the fallback)

    @property
    def predicted(self) -> np.ndarray:
        return self.intercept + self.slope * self.x

    @property
    def residuals(self) -> np.ndarray:
        return self.y - self.predicted

    @property
    def relative_residuals(self) -> np.ndarray:
        return self.residuals / self.y

    @property
    def r2(self) -> float:
        ss_tot = float(((self.y - self.y.mean()) ** 2).sum())
        ss_res = float((self.residuals ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0

    def report(self, x_name: str) -> dict:
        """JSON-ready record of the fit (kept in cluster.json next to the fitted numbers)."""
        rel = np.abs(self.relative_residuals)
        return {"method": f"least squares of the {self.method} error, intercept >= 0",
                "x": x_name, "samples": [[float(a), float(b)] for a, b in zip(self.x, self.y)],
                "residuals": [float(r) for r in self.residuals], "r2": self.r2,
                "max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean())}


def fit_affine(x, y) -> AffineFit:
    """Fit `y ~ c + m*x` minimising sum(((y - c - m*x) / y)**2) with c >= 0 and m > 0.

    Repeated x values are fine (they are several measurements of the same point). When noise
    makes the small samples disagree so much that the relative fit's slope is not positive,
    the fit falls back to plain (absolute error) least squares, which the large samples decide.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise InputError(f"a fit needs at least 2 (x, y) pairs of equal length, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (y <= 0).any() or (x < 0).any():
        raise InputError("fit samples must be finite, with x >= 0 and y > 0")
    if np.unique(x).size < 2:
        raise InputError("a fit needs samples at two or more distinct sizes")
    for method, w in (("relative", 1.0 / y), ("absolute", np.full_like(y, 1.0 / y.mean()))):
        c, m = _weighted_affine(x, y, w)
        if m > 0:
            return AffineFit(c, m, x, y, method)
    raise InputError("measurements do not grow with size; cannot fit a positive slope "
                     f"(samples x={x.tolist()}, y={y.tolist()})")


def _weighted_affine(x, y, w) -> tuple[float, float]:
    """Least squares of w*(y - c - m*x) with c >= 0 (on c < 0 the optimum lies on c = 0)."""
    design = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (c, m), *_ = np.linalg.lstsq(design, y * w, rcond=None)
    if c < 0:
        c, m = 0.0, (w * w * x * y).sum() / (w * w * x * x).sum()
    return float(c), float(m)


def fit_compute(tokens, seconds) -> ComputeModel:
    """Compute model `a + b*n` of one expert's forward+backward from (tokens, seconds) samples."""
    f = fit_affine(tokens, seconds)
    return ComputeModel(a=f.intercept, b=f.slope, fit=f.report("tokens"))


def fit_link(nbytes, seconds) -> tuple[Link, dict]:
    """Link model `alpha + bytes/beta` from one-way (bytes, seconds) samples; returns the fit record too."""
    f = fit_affine(nbytes, seconds)
    return Link(alpha=f.intercept, beta=1.0 / f.slope), f.report("bytes")

"""Option values shared by the commands: named choices, step ranges and layer lists of a trace."""

from __future__ import annotations

from typing import Literal

from cost_models.files import InputError
from planner.solve import OBJECTIVES, PREDICTORS
from planner.solvers import SOLVERS

# Option types whose choices come from the module that owns the names: `--help` lists them and any
# other value fails in one line. (Literal of a tuple is the Literal of its items.)
SolverName = Literal[tuple(SOLVERS)]
PredictorName = Literal[PREDICTORS]
ObjectiveName = Literal[OBJECTIVES]


def parse_steps(text: str, num_steps: int) -> slice:
    """'A:B' (Python slice of step positions; either end may be left out)."""
    if not text:
        return slice(None)
    parts = text.split(":")
    if len(parts) != 2:
        raise InputError(f"--steps must look like A:B, got {text!r}")
    try:
        a, b = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise InputError(f"--steps must hold whole numbers, got {text!r}") from None
    if len(range(num_steps)[slice(a, b)]) == 0:
        raise InputError(f"--steps {text} selects no step of the trace's {num_steps}")
    return slice(a, b)


def parse_layers(text: str, num_layers: int) -> list[int] | None:
    if not text:
        return None
    try:
        layers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(f"--layers must be comma-separated layer positions, got {text!r}") from None
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise InputError(f"--layers {text}: positions must be in 0..{num_layers - 1}")
    return layers

"""Routing traces: `counts[step, layer, source_device, expert]` token counts plus metadata.

The source axis says how many tokens cross which links, so it is kept, not summed away.
Stored as `.npz` (arrays plus a JSON metadata string, no pickles) or as JSON (`flexmoe.trace/1`).
The trace lives in `planner` because the runtime records traces and may not import `experiments`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cost_models.files import (MAX_COUNT, InputError, atomic_path, check_schema, parse_json, read_json,
                               read_npz, whole_number, write_json_atomic)

SCHEMA = "flexmoe.trace/1"


@dataclass
class Trace:
    counts: np.ndarray  # int64 [steps, layers, sources, experts]
    top_k: int = 1
    step_ids: np.ndarray | None = None  # the training step each row was recorded at
    layer_ids: np.ndarray | None = None  # the model's MoE layer ids
    origin: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.counts = _check_counts(self.counts, None)
        steps, layers = self.counts.shape[:2]
        self.step_ids = _ids(self.step_ids, steps, "step_ids", None)
        self.layer_ids = _ids(self.layer_ids, layers, "layer_ids", None)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            raise InputError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        self.top_k = int(self.top_k)

    @property
    def num_steps(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def num_sources(self) -> int:
        return self.counts.shape[2]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[3]

    def expert_loads(self) -> np.ndarray:
        """[steps, layers, experts]: tokens per expert, summed over sources."""
        return self.counts.sum(axis=2)

    def select(self, steps: slice | np.ndarray | None = None, layers: list[int] | None = None) -> "Trace":
        """A sub-trace by step positions and by layer positions."""
        counts, step_ids, layer_ids = self.counts, self.step_ids, self.layer_ids
        if steps is not None:
            counts, step_ids = counts[steps], step_ids[steps]
        if layers is not None:
            bad = [l for l in layers if not 0 <= l < self.num_layers]
            if bad:
                raise InputError(f"layer positions {bad} out of range 0..{self.num_layers - 1}")
            counts, layer_ids = counts[:, layers], layer_ids[layers]
        if counts.shape[0] == 0:
            raise InputError("the step selection is empty")
        return Trace(counts, self.top_k, step_ids, layer_ids, self.origin, dict(self.meta))

    # --- files ---------------------------------------------------------------------------
    def _meta_doc(self) -> dict:
        return {"schema": SCHEMA, "top_k": self.top_k, "origin": self.origin, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> None:
        """`.json` writes JSON; anything else writes a compressed `.npz`."""
        path = Path(path)
        if path.suffix == ".json":
            doc = self._meta_doc() | {"counts": self.counts.tolist(), "step_ids": self.step_ids.tolist(),
                                      "layer_ids": self.layer_ids.tolist()}
            write_json_atomic(path, doc)
            return
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, counts=self.counts, step_ids=self.step_ids, layer_ids=self.layer_ids,
                                    meta=np.array(json.dumps(self._meta_doc())))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        path = Path(path)
        if path.suffix == ".json":
            doc = check_schema(read_json(path, "trace"), SCHEMA, path, "trace")
            if "counts" not in doc:
                raise InputError("missing 'counts'", path)
            try:
                counts = np.asarray(doc["counts"], dtype=np.float64)
            except (ValueError, TypeError, OverflowError, RecursionError):
                raise InputError("'counts' must be a rectangular 4-D array of finite numbers "
                                 "[step, layer, source, expert]", path) from None
            return cls._build(counts, doc, doc.get("step_ids"), doc.get("layer_ids"), path)
        arrays = read_npz(path, "trace")
        for key in ("counts", "meta"):
            if key not in arrays:
                raise InputError(f"missing array {key!r} in the .npz trace", path)
        if arrays["meta"].ndim != 0 or arrays["meta"].dtype.kind != "U":
            raise InputError("the 'meta' array must be one JSON string", path)
        doc = check_schema(parse_json(str(arrays["meta"]), path, "trace metadata"), SCHEMA, path, "trace")
        return cls._build(arrays["counts"], doc, arrays.get("step_ids"), arrays.get("layer_ids"), path)

    @classmethod
    def _build(cls, counts, doc, step_ids, layer_ids, path) -> "Trace":
        counts = _check_counts(counts, path)
        steps, layers = counts.shape[:2]
        top_k = whole_number(doc.get("top_k", 1), "top_k", path, minimum=1)
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise InputError("'meta' must be an object", path)
        return cls(counts, top_k, _ids(step_ids, steps, "step_ids", path),
                   _ids(layer_ids, layers, "layer_ids", path), str(doc.get("origin", "")), meta)


def _check_counts(counts, path) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 4:
        raise InputError(f"counts must be 4-D [step, layer, source, expert], got shape {counts.shape}", path)
    if 0 in counts.shape:
        raise InputError(f"counts is empty (shape {counts.shape})", path)
    if not (np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
        raise InputError(f"counts must be numbers, got dtype {counts.dtype}", path)
    if np.issubdtype(counts.dtype, np.floating):
        if not np.isfinite(counts).all():
            raise InputError("counts hold NaN or infinite values", path)
        if (counts != np.round(counts)).any():
            raise InputError("counts must be whole token numbers", path)
    if (counts < 0).any():
        where = tuple(int(i) for i in np.argwhere(counts < 0)[0])
        raise InputError(f"counts must be non-negative; first negative at [step, layer, source, expert]={where}",
                         path)
    if (counts > MAX_COUNT).any():  # before the int64 cast, which would wrap uint64 giants to negatives
        where = tuple(int(i) for i in np.argwhere(counts > MAX_COUNT)[0])
        raise InputError(f"counts must be at most {MAX_COUNT} tokens; first larger at [step, layer, source, "
                         f"expert]={where}", path)
    return counts.astype(np.int64)


def _ids(ids, n: int, name: str, path) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    try:
        raw = np.asarray(ids)
        if raw.dtype.kind not in "iu" and not (raw.dtype.kind == "f" and np.isfinite(raw).all()
                                                and (raw == np.round(raw)).all()):
            raise ValueError
        if raw.size and (np.abs(raw.astype(np.float64)) > 2**53).any():
            raise ValueError
        ids = raw.astype(np.int64)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{name} must be integers of at most 2**53", path) from None
    if ids.shape != (n,):
        raise InputError(f"{name} has shape {ids.shape}, expected ({n},) to match counts", path)
    return ids

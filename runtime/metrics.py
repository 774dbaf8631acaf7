"""Per-step training metrics (`flexmoe train --metrics-out FILE`): JSON lines, or CSV by suffix.

One row per step: the mean loss over ranks, tokens per second (all ranks' tokens over the step's
wall time on rank 0), the worst layer's balance (max over mean tokens per device under the shares
dispatched), whether the step committed a re-placement and how many had been committed so far,
the bytes moved across ranks (all ranks together: expert gradients to owners, weights back,
moving owners' optimizer moments), the background planner's failures so far (`runtime.replan`)
and rank 0's busy time in each phase of the step. Rank 0 writes
the file once, atomically, at the end of the run. Bad paths are refused before training starts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from cost_models.files import InputError, write_text_atomic

FLOAT_BYTES = 4  # expert vectors travel as float32


def check_path(path: str | os.PathLike) -> None:
    """Refuse, before training, a metrics path that cannot be written (InputError)."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise InputError("metrics file needs a file name", path)
    if p.is_dir():
        raise InputError("metrics path is a directory", path)
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # atomic writes create missing folders; check the first that exists
    if not parent.is_dir():
        raise InputError(f"cannot write the metrics file: {parent} is not a directory", path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the metrics file: {parent} is not writable", path)


def migration_floats(old, new, params: int) -> int:
    """Floats of optimizer moments (two vectors per expert) that a re-placement moved between ranks."""
    return 2 * params * sum(int((a.owner != b.owner).sum()) for a, b in zip(old.layers, new.layers))


def phase_key(name: str) -> str:
    return "t_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + "_s"


def rows(result: dict, step_bytes: list[tuple[int, int]]) -> list[dict]:
    """Rows from a `runtime.trainer.train` result and each step's (sync, migration) bytes, all ranks."""
    out, committed = [], 0
    phases = np.asarray(result["phases"])
    for i, loss in enumerate(result["losses"]):
        dt = float(result["step_times"][i])
        replanned = bool(result["changes"][i])
        committed += replanned
        sync, migration = step_bytes[i]
        row = {"step": result["start"] + i, "loss": float(loss), "step_s": dt,
               "tokens_per_s": result["tokens_per_step"] / dt if dt > 0 else math.inf,
               "balance": float(result["balances"][i]), "replanned": replanned, "replans_committed": committed,
               "bytes_moved": int(sync + migration), "sync_bytes": int(sync), "migration_bytes": int(migration),
               "planner_failures": int(result["planner_failures"][i])}
        for name, t in zip(result["phase_names"], phases[i] if len(phases) else []):
            row[phase_key(name)] = float(t)
        out.append(row)
    return out


def render(path: str | os.PathLike, table: list[dict]) -> str:
    if str(path).lower().endswith(".csv"):
        buf = io.StringIO()
        if table:
            w = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(table)
        return buf.getvalue()
    return "".join(json.dumps(r, allow_nan=False) + "\n" for r in table)


def write(path: str | os.PathLike, table: list[dict]) -> None:
    write_text_atomic(path, render(path, table))


def summary(table: list[dict]) -> str:
    """One line for logs: steps, first and last loss, mean tokens/s, mean balance, re-plans, bytes
    (and planner failures, when there were any)."""
    if not table:
        return "[flexmoe] 0 steps"
    tok = np.mean([r["tokens_per_s"] for r in table])
    bal = np.mean([r["balance"] for r in table])
    moved = sum(r["bytes_moved"] for r in table)
    return (f"[flexmoe] {len(table)} steps, loss {table[0]['loss']:.4f} -> {table[-1]['loss']:.4f}, "
            f"{tok:,.0f} tokens/s, balance {bal:.3f} (mean), {table[-1]['replans_committed']} re-plans committed, "
            f"{moved / 2**20:.2f} MiB moved"
            + (f", {table[-1]['planner_failures']} planner failures" if table[-1].get("planner_failures") else ""))

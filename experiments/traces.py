"""Where traces come from: synthetic generators, the SmartMoE-AE log importer, imbalance stats."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import numpy as np

from cost_models.files import MAX_COUNT, InputError, read_npz
from planner.plan import static_layer
from planner.trace import Trace

SYNTH_KINDS = ("uniform", "zipf", "lognormal", "drift", "rotate", "burst")


def synth(kind: str, *, steps: int = 100, layers: int = 1, sources: int = 16, experts: int = 32,
          tokens_per_source: int = 4096, top_k: int = 2, seed: int = 0, alpha: float = 1.0,
          sigma: float = 1.0, drift: float = 0.1, period: int = 10, burst_prob: float = 0.05,
          burst_factor: float = 8.0, burst_len: int = 3) -> Trace:
    """A seeded synthetic trace. Each source routes `tokens_per_source * top_k` token-slots per
    step, drawn from that step's expert popularity (multinomial; shared by all sources).

    uniform: equal popularity. zipf: popularity ~ 1/rank**alpha, ranks shuffled per layer.
    lognormal: exp(sigma * N(0,1)). drift: zipf whose log-popularity takes a random walk of
    step `drift`. rotate: zipf whose hot set shifts by one expert every `period` steps.
    burst: zipf plus, with probability `burst_prob` per step, one expert `burst_factor` times
    hotter for `burst_len` steps.
    """
    if kind not in SYNTH_KINDS:
        raise InputError(f"unknown synthetic kind {kind!r} (known: {', '.join(SYNTH_KINDS)})")
    for name, value in (("steps", steps), ("layers", layers), ("sources", sources), ("experts", experts),
                        ("tokens_per_source", tokens_per_source), ("top_k", top_k), ("period", period),
                        ("burst_len", burst_len)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if top_k > experts:
        raise InputError(f"top_k ({top_k}) cannot exceed the number of experts ({experts})")
    for name, value in (("alpha", alpha), ("sigma", sigma), ("drift", drift), ("burst_factor", burst_factor)):
        if not np.isfinite(value) or value < 0:
            raise InputError(f"{name} must be a finite number >= 0, got {value}")
    if not 0 <= burst_prob <= 1:
        raise InputError(f"burst_prob must be in [0, 1], got {burst_prob}")
    rng = np.random.default_rng(seed)
    counts = np.zeros((steps, layers, sources, experts), dtype=np.int64)
    zipf_logits = -alpha * np.log(np.arange(1, experts + 1))
    for l in range(layers):
        if kind == "lognormal":
            logits = sigma * rng.standard_normal(experts)
        else:
            logits = zipf_logits[rng.permutation(experts)] if kind != "uniform" else np.zeros(experts)
        boost = np.zeros(experts)
        boost_left = np.zeros(experts, dtype=np.int64)
        for t in range(steps):
            step_logits = logits
            if kind == "drift" and t:
                logits = logits + drift * rng.standard_normal(experts)
                step_logits = logits
            elif kind == "rotate":
                step_logits = np.roll(logits, t // period)
            elif kind == "burst":
                if rng.random() < burst_prob:
                    e = rng.integers(experts)
                    boost[e], boost_left[e] = np.log(burst_factor) if burst_factor > 0 else -np.inf, burst_len
                step_logits = logits + np.where(boost_left > 0, boost, 0.0)
                boost_left = np.maximum(boost_left - 1, 0)
            p = np.exp(step_logits - step_logits.max())
            p /= p.sum()
            counts[t, l] = rng.multinomial(tokens_per_source * top_k, p, size=sources)
    return Trace(counts, top_k, origin=f"synthetic:{kind}",
                 meta={"kind": kind, "seed": seed, "alpha": alpha, "sigma": sigma, "drift": drift,
                       "period": period, "burst_prob": burst_prob, "burst_factor": burst_factor,
                       "burst_len": burst_len, "tokens_per_source": tokens_per_source})


_LOG_NAME = re.compile(r"table_iter(\d+)_rank(\d+)\.log$")


def import_smartmoe(directory: str | os.PathLike, micro_batches: str = "sum", top_k: int = 2) -> Trace:
    """Read SmartMoE-AE `moe_trace` logs: `table_iter{I}_rank{R}.log`, one line per layer,
    `LAYER:[[counts per expert] per micro-batch]` for source rank R at iteration I. An `.npz`
    holding `counts[iteration, layer, source, micro_batch, expert]` (with `iters`, `layers`) is
    read too: that is the converted excerpt in the team's shared traces.

    micro_batches="sum" gives one step per iteration; "split" gives one step per micro-batch.
    """
    if micro_batches not in ("sum", "split"):
        raise InputError(f"micro_batches must be 'sum' or 'split', got {micro_batches!r}")
    directory = Path(directory)
    if directory.suffix == ".npz" and directory.is_file():
        return _import_smartmoe_npz(directory, micro_batches, top_k)
    if not directory.is_dir():
        raise InputError("not a directory of logs or an .npz excerpt", directory)
    files: dict[tuple[int, int], Path] = {}
    for path in directory.iterdir():
        m = _LOG_NAME.match(path.name)
        if m:
            files[int(m.group(1)), int(m.group(2))] = path
    if not files:
        raise InputError("no table_iter{I}_rank{R}.log files", directory)
    iters = sorted({i for i, _ in files})
    ranks = sorted({r for _, r in files})
    if ranks != list(range(len(ranks))):
        raise InputError(f"source ranks must be 0..{len(ranks) - 1}, found {ranks}", directory)
    missing = [f"iter {i} rank {r}" for i in iters for r in ranks if (i, r) not in files]
    if missing:
        raise InputError(f"missing logs for {', '.join(missing[:5])}", directory)
    tables = {key: _read_smartmoe_log(path) for key, path in files.items()}
    shapes = {t.shape for t in tables.values()}
    if len(shapes) != 1:
        raise InputError(f"logs disagree on [layers, micro-batches, experts]: {sorted(shapes)}", directory)
    layers, mbs, experts = shapes.pop()
    raw = np.zeros((len(iters), layers, len(ranks), mbs, experts), dtype=np.int64)
    for (i, r), table in tables.items():
        raw[iters.index(i), :, r] = table
    return _from_micro_batches(raw, np.array(iters), np.arange(layers), micro_batches, top_k,
                               f"smartmoe-ae:{directory.name}")


def _from_micro_batches(raw: np.ndarray, iters: np.ndarray, layer_ids: np.ndarray, micro_batches: str,
                        top_k: int, origin: str) -> Trace:
    """raw[iteration, layer, source, micro_batch, expert] -> a trace, one step per iteration or per micro-batch."""
    its, layers, sources, mbs, experts = raw.shape
    if micro_batches == "sum":
        counts, step_ids = raw.sum(axis=3), iters
    else:  # [iter, mb, layer, source, expert] -> one step per micro-batch
        counts = raw.transpose(0, 3, 1, 2, 4).reshape(its * mbs, layers, sources, experts)
        step_ids = np.repeat(iters, mbs)
    return Trace(counts, top_k, step_ids, layer_ids, origin,
                 {"micro_batches": micro_batches, "micro_batches_per_iteration": mbs})


def _import_smartmoe_npz(path: Path, micro_batches: str, top_k: int) -> Trace:
    """The converted excerpt: counts[iteration, layer, source, micro_batch, expert], iters, layers."""
    arrays = read_npz(path, "SmartMoE excerpt")
    raw = arrays.get("counts")
    if raw is None or raw.ndim != 5:
        raise InputError("expected 'counts' of shape [iteration, layer, source, micro_batch, expert]", path)
    its, layers = raw.shape[:2]
    iters = arrays.get("iters", np.arange(its))
    layer_ids = arrays.get("layers", np.arange(layers))
    if iters.shape != (its,) or layer_ids.shape != (layers,):
        raise InputError("'iters' and 'layers' must match the counts' first two axes", path)
    if raw.dtype.kind not in "iuf" or (raw.dtype.kind == "f" and not np.isfinite(raw).all()) \
            or (raw < 0).any() or (raw > MAX_COUNT).any() or (raw != np.round(raw)).any():
        raise InputError(f"'counts' must hold whole numbers in 0..{MAX_COUNT}", path)
    try:
        return _from_micro_batches(raw.astype(np.int64), iters, layer_ids, micro_batches, top_k,
                                   f"smartmoe-ae:{path.name}")
    except InputError as exc:
        raise InputError(exc.problem, path) from None


def _read_smartmoe_log(path: Path) -> np.ndarray:
    rows = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {exc}", path) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        layer, sep, body = line.partition(":")
        try:
            if not sep:
                raise ValueError("no ':'")
            table = np.array(ast.literal_eval(body.strip()), dtype=np.float64)
        except (RecursionError, MemoryError):
            raise InputError(f"line {n}: nested too deeply", path) from None
        except (ValueError, SyntaxError, TypeError, OverflowError) as exc:
            raise InputError(f"line {n}: expected 'LAYER:[[counts], ...]': {exc}", path) from None
        if table.ndim != 2 or not layer.strip().isdigit():
            raise InputError(f"line {n}: expected 'LAYER:[[counts per expert] per micro-batch]'", path)
        if not np.isfinite(table).all() or (table < 0).any() or (table != np.round(table)).any() \
                or (table > MAX_COUNT).any():
            raise InputError(f"line {n}: counts must be non-negative whole numbers of at most {MAX_COUNT}", path)
        rows[int(layer)] = table.astype(np.int64)
    if not rows:
        raise InputError("no layer lines", path)
    if sorted(rows) != list(range(len(rows))):
        raise InputError(f"layers must be 0..{len(rows) - 1}, found {sorted(rows)}", path)
    shapes = {t.shape for t in rows.values()}
    if len(shapes) != 1:
        raise InputError(f"layers disagree on [micro-batches, experts]: {sorted(shapes)}", path)
    return np.stack([rows[l] for l in range(len(rows))])


def imbalance_stats(trace: Trace, devices: int | None = None) -> list[dict]:
    """Per layer: expert imbalance (max/mean expert load) and the device imbalance of plain expert
    parallelism on `devices` devices (experts in contiguous blocks), mean and worst over steps."""
    devices = devices or trace.num_sources
    slots = np.full(devices, -(-trace.num_experts // devices))
    home = static_layer(trace.num_experts, slots).replicas().argmax(axis=1)  # [experts] -> device
    loads = trace.expert_loads().astype(np.float64)  # [steps, layers, experts]
    expert_ratio = loads.max(axis=2) / np.maximum(loads.mean(axis=2), 1e-12)
    device_loads = np.zeros(loads.shape[:2] + (devices,))
    np.add.at(device_loads, (slice(None), slice(None), home), loads)
    device_ratio = device_loads.max(axis=2) / np.maximum(device_loads.mean(axis=2), 1e-12)
    return [{"layer": int(trace.layer_ids[l]),
             "tokens_per_step": float(loads[:, l].sum(axis=1).mean() / trace.top_k),
             "expert_max_over_mean": float(expert_ratio[:, l].mean()),
             "expert_max_over_mean_worst": float(expert_ratio[:, l].max()),
             "device_max_over_mean": float(device_ratio[:, l].mean()),
             "device_max_over_mean_worst": float(device_ratio[:, l].max())}
            for l in range(trace.num_layers)]

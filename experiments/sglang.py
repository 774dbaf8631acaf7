"""SGLang's files, read and written as SGLang's own code defines them (torch imported lazily).

Followed (sgl-project/sglang, `python/sglang/srt/eplb/`):

- `expert_location.py`, `compute_initial_expert_location_metadata`: `--init-expert-location FILE`
  loads a `.pt` with `torch.load(FILE, weights_only=True)` or a `.json` with `json.loads`; a dict
  holding `physical_to_logical_map` is passed as keyword arguments to
  `ExpertLocationMetadata.init_by_mapping(server_args, model_config, **dict)`, so that must be the
  dict's only key. The map is `[layers, num_physical_experts]`; `_init_common` asserts
  `num_physical = num_logical + ep_num_redundant_experts` and `num_physical % ep_size == 0`;
  physical expert p lives on GPU `p // (num_physical // ep_size)`; every entry indexes a logical
  expert (a -1 would be taken, by Python's negative indexing, as the last expert).
- `expert_distribution.py`, the recorder's dumps (`torch.save` of a dict):
  - `stat` / `stat_approx` mode (`_StatAccumulator.dump`, rank 0): `rank`, `logical_count`
    `[buffered passes, layers, logical experts]` (summed over ranks), and
    `average_utilization_rate_over_window` (float or None). With a finite buffer the rows are a
    circular buffer: unfilled rows are zero and the order is not chronological.
  - `per_pass` mode (`_DetailAccumulator.dump`, one file per rank): `records`, a list of dicts
    with `forward_pass_id`, `rank`, `gatherer_key` and `global_physical_count`
    `[layers, physical experts]`, plus `last_physical_to_logical_map` `[layers, physical]` (the
    map at dump time: it may have changed while recording). `per_token` mode records
    `topk_ids_of_layer` instead, which is not read here.
Neither dump says which rank's tokens went to which expert: the trace gets one source, which the
planner and estimator spread evenly over the devices (`fold_sources`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import estimate, fold_sources
from cost_models.files import InputError, atomic_path, write_json_atomic
from planner.physical_map import equal_share_plan, physical_map
from planner.plan import EMPTY, Plan
from planner.trace import Trace

NO_SOURCE_AXIS = ("SGLang's recorder keeps no per-source axis (which rank's tokens went to which expert): "
                  "all tokens are put on one source, which planning spreads evenly over the devices")


# --- --init-expert-location ------------------------------------------------------------------
def check_expert_location(phy2log: np.ndarray, num_experts: int, ep_size: int) -> dict:
    """The checks SGLang makes on an initial expert location; returns the figures to print."""
    phy2log = np.asarray(phy2log)
    if phy2log.ndim != 2:
        raise InputError(f"physical_to_logical_map must be [layers, num_physical], got shape {phy2log.shape}")
    layers, num_physical = phy2log.shape
    if (phy2log < 0).any() or (phy2log >= num_experts).any():
        raise InputError(f"physical_to_logical_map holds ids outside 0..{num_experts - 1} (SGLang takes -1 "
                         "as the last expert)")
    redundant = num_physical - num_experts
    if redundant < 0:
        raise InputError(f"{num_physical} physical experts cannot hold {num_experts} logical ones")
    if num_physical % ep_size:
        raise InputError(f"{num_physical} physical experts do not divide by the EP size {ep_size}")
    missing = [(i, e) for i in range(layers) for e in range(num_experts) if not (phy2log[i] == e).any()]
    if missing:
        raise InputError(f"logical expert {missing[0][1]} has no physical replica in layer {missing[0][0]}")
    return {"layers": layers, "num_physical": num_physical, "num_logical": num_experts,
            "redundant": redundant, "ep_size": ep_size, "per_gpu": num_physical // ep_size}


def save_expert_location(phy2log: np.ndarray, path: str | os.PathLike, suffix: str | None = None) -> None:
    """Write `{"physical_to_logical_map": phy2log}` as a `.pt` (an int64 tensor, loadable with
    `torch.load(weights_only=True)`) or a `.json` (nested lists): nothing else, since SGLang passes
    the dict's keys on as keyword arguments. `suffix` names the format when `path` is a temporary
    file standing for the real one."""
    path = Path(path) if suffix else _check_suffix(path)
    phy2log = np.asarray(phy2log, dtype=np.int64)
    if (suffix or path.suffix) == ".json":
        write_json_atomic(path, {"physical_to_logical_map": phy2log.tolist()})
    else:
        import torch
        with atomic_path(path) as tmp:
            torch.save({"physical_to_logical_map": torch.from_numpy(phy2log.copy())}, str(tmp))


def _check_suffix(path) -> Path:
    path = Path(path)
    if path.suffix not in (".pt", ".json"):
        raise InputError("the SGLang expert location must be a .pt or a .json file (SGLang reads nothing else)",
                         path)
    return path


def sglang_export(cluster: Cluster, loads: np.ndarray, plan: Plan,
                  path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """`plan` as SGLang's physical_to_logical_map (spare slots filled), checked as SGLang checks it,
    and lines that say what SGLang's equal shares cost next to the plan's own shares, by the
    estimator on `loads[layer, source, expert]`. Writes nothing (`save_expert_location` does)."""
    _check_suffix(path)
    loads = np.asarray(loads, dtype=np.float64)
    phy2log = physical_map(plan, loads.sum(axis=1))
    f = check_expert_location(phy2log, plan.num_experts, plan.num_devices)
    spare = sum(int((lp.assign[:, :f["per_gpu"]] == EMPTY).sum()) for lp in plan.layers)
    equal = equal_share_plan(plan, phy2log)
    own_t = eq_t = 0.0
    own_b, eq_b = [], []
    for i, (lp, eq) in enumerate(zip(plan.layers, equal.layers)):
        counts = fold_sources(loads[i], cluster.num_devices)
        a = estimate(cluster, counts, lp.replicas(), lp.shares(), lp.owner)
        b = estimate(cluster, counts, eq.replicas(), eq.shares(), eq.owner)
        own_t, eq_t = own_t + a.step_time, eq_t + b.step_time
        own_b.append(a.balance)
        eq_b.append(b.balance)
    lines = [f"sglang: {f['layers']} layers x {f['num_physical']} physical experts = {f['num_logical']} logical + "
             f"{f['redundant']} redundant, {f['per_gpu']} per GPU on {f['ep_size']} GPUs (SGLang: --ep-size "
             f"{f['ep_size']} --ep-num-redundant-experts {f['redundant']}); {spare} spare slots filled with replicas",
             f"sglang splits an expert's tokens evenly over its replicas; by the estimator that costs: step "
             f"{eq_t * 1e3:.3f} ms (the plan's own shares: {own_t * 1e3:.3f} ms, {(eq_t / own_t - 1) * 100 if own_t > 0 else 0.0:+.1f}%), "
             f"mean balance {np.mean(eq_b):.3f} (plan's: {np.mean(own_b):.3f}), worst layer {max(eq_b):.3f} "
             f"(plan's: {max(own_b):.3f})"]
    return phy2log, lines


# --- recorder dumps ----------------------------------------------------------------------------
def _load_torch(path: Path) -> dict:
    import torch
    if not path.is_file():
        raise InputError("no such file", path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the reading boundary: whatever torch raises on a bad file
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise InputError(f"not a torch file that loads with weights_only=True ({type(exc).__name__}: {first})",
                         path) from None
    if not isinstance(data, dict):
        raise InputError(f"expected a dict (an SGLang recorder dump), found {type(data).__name__}", path)
    return data


def _array(value, name: str, ndims: tuple[int, ...], path: Path) -> np.ndarray:
    import torch
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name!r} must be a tensor, found {type(value).__name__}", path)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise InputError(f"{name!r} must hold integer counts, found dtype {value.dtype}", path)
    arr = value.detach().cpu().numpy().astype(np.int64)
    if arr.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise InputError(f"{name!r} must be {want}, got shape {tuple(arr.shape)}", path)
    if 0 in arr.shape:
        raise InputError(f"{name!r} is empty (shape {tuple(arr.shape)})", path)
    return arr


def import_sglang(path: str | os.PathLike, top_k: int = 1) -> Trace:
    """A trace `counts[pass, layer, 1, logical expert]` from an SGLang expert-distribution recorder
    dump (`stat` or `per_pass` mode). `meta["lacks"]` says what the format does not hold."""
    path = Path(path)
    data = _load_torch(path)
    meta: dict = {"lacks": NO_SOURCE_AXIS, "top_k_recorded": False}
    if "logical_count" in data:
        counts = _array(data["logical_count"], "logical_count", (2, 3), path)
        if counts.ndim == 2:  # one pass, as SGLang's init_by_eplb also accepts
            counts = counts[None]
        _non_negative(counts, "logical_count", path)
        keep = counts.reshape(counts.shape[0], -1).any(axis=1)
        if not keep.any():
            raise InputError("logical_count holds no token (every buffered pass is zero)", path)
        dropped = int((~keep).sum())
        counts = counts[keep]
        step_ids = np.flatnonzero(keep)
        meta.update(mode="stat", dropped_empty_passes=dropped,
                    note="rows are SGLang's buffered passes; a finite (circular) buffer is not in time order")
    elif "records" in data:
        counts, step_ids = _per_pass(data, path)
        meta.update(mode="per_pass", rank=_rank_of(data),
                    note="physical counts mapped to logical experts with last_physical_to_logical_map")
    elif "physical_to_logical_map" in data:
        raise InputError("this is an expert-location file (physical_to_logical_map), not a recorder dump", path)
    else:
        raise InputError(f"not an SGLang recorder dump: expected 'logical_count' (stat mode) or 'records' with "
                         f"'last_physical_to_logical_map' (per_pass mode), found keys {sorted(map(str, data))}",
                         path)
    return Trace(counts[:, :, None, :], top_k, step_ids, None, f"sglang:{path.name}", meta)


def _non_negative(arr: np.ndarray, name: str, path: Path) -> None:
    if (arr < 0).any():
        where = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise InputError(f"{name} holds negative counts (first at {where})", path)


def _rank_of(data: dict):
    recs = data.get("records") or []
    ranks = sorted({r.get("rank") for r in recs if isinstance(r, dict) and isinstance(r.get("rank"), int)})
    return ranks[0] if len(ranks) == 1 else ranks


def _per_pass(data: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if "last_physical_to_logical_map" not in data:
        raise InputError("a per_pass dump needs 'last_physical_to_logical_map' next to 'records'", path)
    phy2log = _array(data["last_physical_to_logical_map"], "last_physical_to_logical_map", (2,), path)
    if (phy2log < 0).any():
        raise InputError("last_physical_to_logical_map holds negative expert ids", path)
    layers, num_physical = phy2log.shape
    num_experts = int(phy2log.max()) + 1
    records = data["records"]
    if not isinstance(records, list) or not records:
        raise InputError("'records' must be a non-empty list of per-pass dicts", path)
    by_pass: dict[int, np.ndarray] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"records[{i}] is a {type(rec).__name__}, not a dict", path)
        if "topk_ids_of_layer" in rec and "global_physical_count" not in rec:
            raise InputError("per_token dumps (topk_ids_of_layer) are not read; record in 'stat' or 'per_pass' "
                             "mode", path)
        for key in ("forward_pass_id", "global_physical_count"):
            if key not in rec:
                raise InputError(f"records[{i}] has no {key!r}", path)
        pid = rec["forward_pass_id"]
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise InputError(f"records[{i}]['forward_pass_id'] must be an integer", path)
        phys = _array(rec["global_physical_count"], f"records[{i}]['global_physical_count']", (2,), path)
        if phys.shape != (layers, num_physical):
            raise InputError(f"records[{i}]['global_physical_count'] has shape {tuple(phys.shape)}, the map "
                             f"{(layers, num_physical)}", path)
        _non_negative(phys, f"records[{i}]['global_physical_count']", path)
        logical = np.zeros((layers, num_experts), dtype=np.int64)
        for layer in range(layers):
            logical[layer] = np.bincount(phy2log[layer], weights=phys[layer], minlength=num_experts)
        by_pass[pid] = by_pass.get(pid, 0) + logical  # several gatherer keys of one pass add up
    ids = sorted(by_pass)
    return np.stack([by_pass[p] for p in ids]), np.array(ids, dtype=np.int64)

"""Checkpoints: dense weights and optimizer, every expert's weights and moments, the placement,
the step, the RNG state, and the re-placement state (the monitor's smoothed counts, the trigger,
a finished plan not yet applied), so that a resumed run repeats the uninterrupted one exactly.

Experts are stored per expert, not per slot, so a checkpoint does not depend on where replicas
sat: resume rebuilds the slots from the saved placement and hands each owner its moments.
Written atomically by rank 0 (every rank has the gathered state). `load` checks every part
against the model and world size before any worker starts.
"""

from __future__ import annotations

import os

import torch

from cost_models.files import MAX_WHOLE, InputError, atomic_path, whole_number
from planner.plan import Plan

FORMAT = "flexmoe.checkpoint/1"
KEYS = ("model", "step", "adam_t", "dense", "dense_opt", "experts", "plan", "rng")


def save(path: str | os.PathLike, *, model_cfg: dict, step: int, adam_t: int, dense: dict, dense_opt: dict,
         experts: torch.Tensor, plan: Plan, replan: dict | None = None) -> None:
    doc = {"format": FORMAT, "model": model_cfg, "step": step, "adam_t": adam_t, "dense": dense,
           "dense_opt": dense_opt, "experts": experts.cpu(), "plan": plan.to_dict(),
           "rng": torch.get_rng_state(), "replan": replan}
    with atomic_path(path) as tmp:
        torch.save(doc, tmp)


def load(path: str | os.PathLike, model_cfg: dict, world: int | None = None) -> dict:
    """The checkpoint's parts, each checked: format, model, keys, step, shapes, placement (for
    `world` ranks when given) and re-placement state. Never unpickles code (weights_only)."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError("no such checkpoint file", path) from None
    except IsADirectoryError:
        raise InputError("a directory, not a checkpoint file", path) from None
    except RecursionError:
        raise InputError("not a readable checkpoint: nested too deeply", path) from None
    except Exception as exc:  # torch raises many kinds for a bad file
        raise InputError(f"not a readable checkpoint: {' '.join(str(exc).split())[:200]}", path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"not a {FORMAT} checkpoint", path)
    missing = [k for k in KEYS if k not in doc]
    if missing:
        raise InputError(f"checkpoint lacks {', '.join(missing)}", path)
    if doc["model"] != model_cfg:
        other = doc["model"] if isinstance(doc["model"], dict) else {}
        diff = sorted(k for k in model_cfg if other.get(k) != model_cfg[k])
        raise InputError(f"checkpoint model differs from the requested one in {', '.join(diff)}", path)
    doc["step"] = whole_number(doc["step"], "step", path, maximum=MAX_WHOLE)
    doc["adam_t"] = whole_number(doc["adam_t"], "adam_t", path, maximum=MAX_WHOLE)
    doc["plan"] = Plan.from_dict(doc["plan"], path)
    _check_parts(doc, model_cfg, path)
    plan = doc["plan"]
    if world is not None and plan.num_devices != world:
        raise InputError(f"checkpoint placement is for {plan.num_devices} ranks, not {world}; resume with "
                         f"--world-size {plan.num_devices}", path)
    if doc.get("replan") is not None:
        doc["replan"] = _check_replan(doc["replan"], plan, path)
    return doc


def _check_parts(doc: dict, m: dict, path) -> None:
    from runtime.model import ModelConfig, MoEGPT

    cfg = ModelConfig(**m)
    plan = doc["plan"]
    if plan.num_experts != cfg.num_experts or len(plan.layers) != cfg.n_layers:
        raise InputError(f"checkpoint placement has {plan.num_experts} experts and {len(plan.layers)} layers, "
                         f"the model {cfg.num_experts} and {cfg.n_layers}", path)
    params = 2 * cfg.d_model * cfg.d_ff + cfg.d_model + cfg.d_ff
    shape = (3, cfg.n_layers, cfg.num_experts, params)
    ex = doc["experts"]
    if not isinstance(ex, torch.Tensor) or tuple(ex.shape) != shape or ex.dtype != torch.float32:
        got = tuple(ex.shape) if isinstance(ex, torch.Tensor) else type(ex).__name__
        raise InputError(f"checkpoint experts must be float32 of shape {shape}, got {got}", path)
    if not torch.isfinite(ex).all():
        raise InputError("checkpoint experts hold NaN or infinite values", path)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        want = {k: tuple(v.shape) for k, v in MoEGPT(cfg).state_dict().items()}
    dense = doc["dense"]
    if not isinstance(dense, dict) or set(dense) != set(want):
        raise InputError("checkpoint dense weights do not match the model's parameters", path)
    for k, v in dense.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != want[k]:
            raise InputError(f"checkpoint dense weight {k} has the wrong shape", path)
    opt = doc["dense_opt"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise InputError("checkpoint dense optimizer state is malformed", path)
    shapes = list(want.values())
    for i, st in opt["state"].items():
        if not isinstance(i, int) or not 0 <= i < len(shapes) or not isinstance(st, dict):
            raise InputError("checkpoint dense optimizer state is malformed", path)
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st and (not isinstance(st[key], torch.Tensor) or tuple(st[key].shape) != shapes[i]):
                raise InputError(f"checkpoint dense optimizer {key} of parameter {i} has the wrong shape", path)
    rng = doc["rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise InputError("checkpoint RNG state is malformed", path)


def _check_replan(state, plan: Plan, path) -> dict:
    """{"smoothed": float64 [L, G, E] or None, "last_trigger": int, "seq": int, "pending": plan dict or None}."""
    if not isinstance(state, dict):
        raise InputError("checkpoint re-placement state is malformed", path)
    sm = state.get("smoothed")
    shape = (len(plan.layers), plan.num_devices, plan.num_experts)
    if sm is not None and (not isinstance(sm, torch.Tensor) or tuple(sm.shape) != shape
                           or not torch.isfinite(sm).all() or (sm < 0).any()):
        raise InputError(f"checkpoint monitor counts must be finite, non-negative, of shape {shape}", path)
    out = {"smoothed": None if sm is None else sm.double().numpy(),
           "last_trigger": whole_number(state.get("last_trigger"), "replan.last_trigger", path),
           "seq": whole_number(state.get("seq"), "replan.seq", path),
           "pending": None}
    if state.get("pending") is not None:
        pending = Plan.from_dict(state["pending"], path)
        if pending.num_devices != plan.num_devices or pending.num_experts != plan.num_experts \
                or len(pending.layers) != len(plan.layers):
            raise InputError("checkpoint pending plan does not fit the placement", path)
        out["pending"] = pending
    return out

"""Checkpoints: dense weights and optimizer, every expert's weights and moments, the placement,
the step and the RNG state.

Experts are stored per expert, not per slot, so a checkpoint does not depend on where replicas
sat: resume rebuilds the slots from the saved placement and hands each owner its moments.
Written atomically by rank 0 (every rank has the gathered state).
"""

from __future__ import annotations

import os

import torch

from cost_models.files import InputError, atomic_path
from planner.plan import Plan

FORMAT = "flexmoe.checkpoint/1"


def save(path: str | os.PathLike, *, model_cfg: dict, step: int, adam_t: int, dense: dict, dense_opt: dict,
         experts: torch.Tensor, plan: Plan) -> None:
    doc = {"format": FORMAT, "model": model_cfg, "step": step, "adam_t": adam_t, "dense": dense,
           "dense_opt": dense_opt, "experts": experts.cpu(), "plan": plan.to_dict(),
           "rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(doc, tmp)


def load(path: str | os.PathLike, model_cfg: dict) -> dict:
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError("no such checkpoint file", path) from None
    except Exception as exc:  # torch raises many kinds for a bad file
        raise InputError(f"not a readable checkpoint: {exc}", path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"not a {FORMAT} checkpoint", path)
    if doc["model"] != model_cfg:
        diff = sorted(k for k in model_cfg if doc["model"].get(k) != model_cfg[k])
        raise InputError(f"checkpoint model differs from the requested one in {', '.join(diff)}", path)
    doc["plan"] = Plan.from_dict(doc["plan"], path)
    return doc

"""Plans: which expert sits in each slot of each device, per layer, with shares and owners.

A replica's *share* is the fraction of its expert's tokens it serves (an expert's shares sum to
1). The *owner* is the device whose replica holds the expert's optimizer state. `info` records
how the plan was made (solver, status, objective, bound, gap, solve time, estimate). The JSON
form is versioned (`flexmoe.plan/1`) and validated on load. An expert has at most one replica
per device: a second one there would only split the same device's work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from cost_models.estimator import cells
from cost_models.files import (InputError, check_schema, read_json, whole_number, write_json_atomic)

MAX_EXPERTS = 2**20  # per layer; beyond it a number in a plan file is a typo
MAX_DEVICES = 2**16

SCHEMA = "flexmoe.plan/1"
EMPTY = -1
SHARE_TOLERANCE = 1e-6


@dataclass
class LayerPlan:
    assign: np.ndarray  # int [devices, max_slots]: expert id in each slot, EMPTY where unused
    share: np.ndarray  # float [devices, max_slots]: share of the expert's tokens this replica serves
    owner: np.ndarray  # int [experts]: device holding the owner replica
    layer_id: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.assign = np.asarray(self.assign, dtype=np.int64)
        self.share = np.asarray(self.share, dtype=np.float64)
        self.owner = np.asarray(self.owner, dtype=np.int64)

    @property
    def num_devices(self) -> int:
        return self.assign.shape[0]

    @property
    def num_experts(self) -> int:
        return self.owner.shape[0]

    def _replica_cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expert, device, share) of each used slot, device by device: from the flat indices, as
        `np.nonzero` of a 2-D array is several times slower."""
        flat = np.flatnonzero(self.assign != EMPTY)
        return self.assign.reshape(-1)[flat], flat // self.assign.shape[1], self.share.reshape(-1)[flat]

    def replicas(self) -> np.ndarray:
        """[experts, devices] bool: where each expert has a replica."""
        x = np.zeros((self.num_experts, self.num_devices), dtype=bool)
        e, dev, _ = self._replica_cells()
        x[e, dev] = True
        return x

    def shares(self) -> np.ndarray:
        """[experts, devices]: the share of each expert's tokens served on each device (summed,
        should a device hold an expert twice: `validate` refuses that)."""
        e, dev, share = self._replica_cells()
        n = self.num_devices
        return np.bincount(e * n + dev, share, self.num_experts * n).reshape(self.num_experts, n)

    def replica_counts(self) -> np.ndarray:
        return self.replicas().sum(axis=1)

    @classmethod
    def from_matrices(cls, x: np.ndarray, share: np.ndarray, owner: np.ndarray, max_slots: int,
                      layer_id: int = 0, info: dict | None = None) -> "LayerPlan":
        """Build from [experts, devices] replica and share matrices, filling slots in expert order."""
        x = np.asarray(x, dtype=bool)
        num_experts, num_devices = x.shape
        es, gs = cells(x)  # by expert, then device
        held = np.bincount(gs, minlength=num_devices)
        over = np.flatnonzero(held > max_slots)
        if len(over):
            g = over[0]
            raise InputError(f"device {g} would hold {held[g]} replicas but has {max_slots} slots")
        # a replica's rank among its device's experts: its place in its device's run of a stable sort
        order = np.argsort(gs, kind="stable")
        slot = np.empty_like(gs)
        slot[order] = np.arange(len(gs)) - (np.cumsum(held) - held)[gs[order]]
        assign = np.full((num_devices, max_slots), EMPTY, dtype=np.int64)
        shares = np.zeros((num_devices, max_slots))
        assign[gs, slot] = es
        shares[gs, slot] = np.asarray(share)[es, gs]
        return cls(assign, shares, np.asarray(owner), layer_id, dict(info or {}))

    def validate(self, slots: np.ndarray, where: str = "") -> None:
        """Raise InputError unless this is a placement the runtime can apply."""
        prefix = f"{where}: " if where else ""
        num_devices, max_slots = self.assign.shape
        if self.share.shape != self.assign.shape:
            raise InputError(f"{prefix}shares have shape {self.share.shape}, slots have {self.assign.shape}")
        if len(slots) != num_devices:
            raise InputError(f"{prefix}plan has {num_devices} devices, expected {len(slots)}")
        num_experts = self.num_experts
        if num_experts == 0:
            raise InputError(f"{prefix}a layer needs at least one expert")
        bad = (self.assign < EMPTY) | (self.assign >= num_experts)
        if bad.any():
            g, s = np.argwhere(bad)[0]
            raise InputError(f"{prefix}device {g} slot {s} holds expert {self.assign[g, s]}, "
                             f"outside 0..{num_experts - 1}")
        beyond = np.arange(max_slots)[None, :] >= np.asarray(slots)[:, None]
        too_many = ((self.assign != EMPTY) & beyond).any(axis=1)
        srt = np.sort(self.assign, axis=1)
        twice = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != EMPTY)).any(axis=1)
        if (too_many | twice).any():
            g = int(np.flatnonzero(too_many | twice)[0])  # the first device at fault, as a loop would say
            if too_many[g]:
                raise InputError(f"{prefix}device {g} uses more than its {slots[g]} slots")
            raise InputError(f"{prefix}device {g} holds two replicas of one expert")
        if not np.isfinite(self.share).all() or (self.share < 0).any():
            raise InputError(f"{prefix}shares must be finite and non-negative")
        if (self.share[self.assign == EMPTY] != 0).any():
            raise InputError(f"{prefix}an empty slot has a non-zero share")
        e, dev, share = self._replica_cells()
        missing = np.flatnonzero(np.bincount(e, minlength=num_experts) == 0)
        if len(missing):
            raise InputError(f"{prefix}experts {missing.tolist()} have no replica")
        sums = np.bincount(e, share, num_experts)
        off = np.flatnonzero(np.abs(sums - 1.0) > SHARE_TOLERANCE)
        if len(off):
            raise InputError(f"{prefix}shares of expert {off[0]} sum to {sums[off[0]]:.9g}, not 1")
        if ((self.owner < 0) | (self.owner >= num_devices)).any():
            raise InputError(f"{prefix}owner device ids must be in 0..{num_devices - 1}")
        held = np.zeros(num_experts * num_devices, dtype=bool)
        held[e * num_devices + dev] = True
        orphans = np.flatnonzero(~held[np.arange(num_experts) * num_devices + self.owner])
        if len(orphans):
            e = orphans[0]
            raise InputError(f"{prefix}expert {e}'s owner is device {self.owner[e]}, which holds no replica of it")


@dataclass
class Plan:
    num_experts: int
    slots: np.ndarray  # int [devices]: expert slots per device
    layers: list[LayerPlan]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.slots = np.asarray(self.slots, dtype=np.int64)

    @property
    def num_devices(self) -> int:
        return len(self.slots)

    def validate(self, path: str | os.PathLike | None = None) -> "Plan":
        if not self.layers:
            raise InputError("a plan needs at least one layer", path)
        for i, layer in enumerate(self.layers):
            if layer.num_experts != self.num_experts:
                raise InputError(f"layer {i} has {layer.num_experts} owners, expected {self.num_experts} experts", path)
            if layer.assign.shape[1] != int(self.slots.max()):
                raise InputError(f"layer {i} has {layer.assign.shape[1]} slot columns, "
                                 f"expected {int(self.slots.max())}", path)
            try:
                layer.validate(self.slots, f"layer {i}")
            except InputError as exc:
                raise InputError(exc.problem, path) from None
        return self

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "num_experts": self.num_experts,
            "num_devices": self.num_devices,
            "slots": self.slots.tolist(),
            "info": self.info,
            "layers": [{"layer": l.layer_id, "slots": l.assign.tolist(), "shares": l.share.tolist(),
                        "owner": l.owner.tolist(), "info": l.info} for l in self.layers],
        }

    @classmethod
    def from_dict(cls, doc, path: str | os.PathLike | None = None) -> "Plan":
        check_schema(doc, SCHEMA, path, "plan")
        try:
            num_experts = whole_number(doc["num_experts"], "num_experts", path, minimum=1, maximum=MAX_EXPERTS)
            num_devices = whole_number(doc["num_devices"], "num_devices", path, minimum=1, maximum=MAX_DEVICES)
            if not isinstance(doc["slots"], list) or not isinstance(doc["layers"], list):
                raise InputError("'slots' and 'layers' must be lists", path)
            slots = [whole_number(s, "slots[]", path, maximum=MAX_EXPERTS) for s in doc["slots"]]
            if len(slots) != num_devices:
                raise InputError(f"'slots' lists {len(slots)} devices, num_devices is {num_devices}", path)
            if sum(slots) < num_experts:
                raise InputError(f"{sum(slots)} slots in all are fewer than the {num_experts} experts", path)
            layers = []
            for i, l in enumerate(doc["layers"]):
                assign = _matrix(l["slots"], np.int64, f"layers[{i}].slots", (num_devices, max(slots)), path)
                share = _matrix(l["shares"], np.float64, f"layers[{i}].shares", (num_devices, max(slots)), path)
                owner = _matrix(l["owner"], np.int64, f"layers[{i}].owner", (num_experts,), path)
                info = l.get("info", {})
                if not isinstance(info, dict):
                    raise InputError(f"layers[{i}].info must be an object", path)
                layers.append(LayerPlan(assign, share, owner, whole_number(l.get("layer", i), "layer", path), info))
            info = doc.get("info", {})
            if not isinstance(info, dict):
                raise InputError("'info' must be an object", path)
        except InputError:
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"malformed plan: missing or mistyped field {exc}", path) from None
        return cls(num_experts, np.array(slots), layers, info).validate(path)

    def save(self, path: str | os.PathLike) -> None:
        self.validate()
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_dict(read_json(path, "plan"), path)


def _matrix(value, dtype, name: str, shape: tuple, path) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InputError(f"{name} must be a rectangular array of numbers", path) from None
    if arr.shape != shape:
        raise InputError(f"{name} has shape {arr.shape}, expected {shape}", path)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} holds NaN or infinite values", path)
    if dtype is np.int64:
        if (arr != np.round(arr)).any() or (np.abs(arr) > 2**53).any():
            raise InputError(f"{name} must hold integers of at most 2**53", path)
    return arr.astype(dtype)


def static_layer(num_experts: int, slots: np.ndarray, layer_id: int = 0) -> LayerPlan:
    """Plain expert parallelism: one replica per expert, dealt out in contiguous blocks.

    Devices get experts in proportion to their slot counts; that is what a fixed-home system does.
    """
    slots = np.asarray(slots, dtype=np.int64)
    if slots.sum() < num_experts:
        raise InputError(f"{slots.sum()} slots in all are fewer than the {num_experts} experts")
    # Contiguous blocks in proportion to slots, never over a device's slots.
    quota = np.minimum(slots, np.floor(num_experts * slots / slots.sum()).astype(np.int64))
    spare = slots - quota
    order = np.argsort(-spare, kind="stable")
    i = 0
    while quota.sum() < num_experts:
        g = order[i % len(order)]
        if spare[g] > 0:
            quota[g] += 1
            spare[g] -= 1
        i += 1
    assign = np.full((len(slots), int(slots.max())), EMPTY, dtype=np.int64)
    share = np.zeros(assign.shape)
    owner = np.zeros(num_experts, dtype=np.int64)
    e = 0
    for g, q in enumerate(quota):
        assign[g, :q] = np.arange(e, e + q)
        share[g, :q] = 1.0
        owner[e:e + q] = g
        e += q
    return LayerPlan(assign, share, owner, layer_id, {"solver": "static"})

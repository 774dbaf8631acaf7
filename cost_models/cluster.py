"""The cluster description: devices, their compute models, the links between them, provenance.

Everything the planner knows about hardware comes from here, so it is plain data with a
versioned JSON form (`flexmoe.cluster/1`) that is validated on load. Devices may differ (kind,
speed, slots): heterogeneity is the normal case, not an option.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import networkx as nx
import numpy as np

from cost_models.files import (InputError, check_schema, finite_number, read_json, whole_number,
                               write_json_atomic)
from cost_models.routing import dense_nodes

SCHEMA = "flexmoe.cluster/1"
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
INTRA, INTER = "intra", "inter"
# Sane upper bounds for a cluster file: beyond them a number is a typo, and sums or the [G, G]
# link matrices would overflow or take minutes.
MAX_DEVICES = 4096
MAX_SLOTS = 65536
MAX_SECONDS = 3600.0  # any latency or per-step compute time
MAX_SIZE = 2**24  # expert hidden and FFN sizes


@dataclass(frozen=True)
class ExpertShape:
    """One expert FFN (two linear layers with biases): what a token and a replica weigh."""

    hidden: int
    ffn: int
    dtype: str = "bf16"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def params(self) -> int:
        return 2 * self.hidden * self.ffn + self.hidden + self.ffn

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's activation in the all-to-all."""
        return self.hidden * self.dtype_bytes

    @property
    def param_bytes(self) -> int:
        """Bytes of one replica's weights; also of its gradient."""
        return self.params * self.dtype_bytes

    @property
    def optimizer_bytes(self) -> int:
        """Adam in mixed precision: fp32 master weights plus two fp32 moments."""
        return self.params * 12

    def memory_bytes(self, owner: bool = True) -> int:
        """Device memory one replica holds: weights and gradients, plus the optimizer state
        when it is the expert's owner (only owners keep optimizer state, see DESIGN.md)."""
        return 2 * self.param_bytes + (self.optimizer_bytes if owner else 0)

    @property
    def flops_per_token(self) -> float:
        """Forward (two GEMMs, 2 flops per multiply-add) plus backward (twice the forward)."""
        return 3.0 * 4.0 * self.hidden * self.ffn


@dataclass(frozen=True)
class ComputeModel:
    """Seconds for one replica's forward+backward on n tokens in one step: `a + b*n`.

    `fit` keeps how it was obtained (samples, residuals) so users can judge it.
    """

    a: float
    b: float
    fit: dict = field(default_factory=dict, compare=False)

    def time(self, tokens: float) -> float:
        return self.a + self.b * tokens


@dataclass(frozen=True)
class Link:
    """A link's cost model: `alpha + bytes / beta` seconds (beta in bytes per second)."""

    alpha: float
    beta: float

    def time(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta


@dataclass(frozen=True)
class Device:
    id: int
    node: int
    kind: str
    memory_bytes: int
    slots: int
    compute: ComputeModel


@dataclass(frozen=True)
class Cluster:
    """Devices plus link classes (`intra`, `inter` node) and optional directed per-pair overrides."""

    name: str
    devices: tuple[Device, ...]
    expert: ExpertShape
    links: dict[str, Link]
    pairs: dict[tuple[int, int], Link] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        _validate(self, None)

    # --- shape -------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @cached_property
    def num_nodes(self) -> int:
        return len({d.node for d in self.devices})

    @cached_property
    def slots(self) -> np.ndarray:
        return np.array([d.slots for d in self.devices], dtype=np.int64)

    @cached_property
    def node_of(self) -> np.ndarray:
        return np.array([d.node for d in self.devices], dtype=np.int64)

    @cached_property
    def node_index(self) -> np.ndarray:
        """[G] each device's node numbered 0..K-1 (a cluster file's node ids may be any integers)."""
        return dense_nodes(self.node_of)

    @cached_property
    def node_onehot(self) -> np.ndarray:
        """[G, K] 1.0 where device g sits on node k: per-node sums are one matrix product."""
        return np.eye(self.num_nodes)[self.node_index]

    @cached_property
    def node_devices(self) -> list[np.ndarray]:
        """Per node (dense numbering), its devices' indices in order."""
        return [np.flatnonzero(self.node_index == k) for k in range(self.num_nodes)]

    @cached_property
    def compute_a(self) -> np.ndarray:
        return np.array([d.compute.a for d in self.devices])

    @cached_property
    def compute_b(self) -> np.ndarray:
        return np.array([d.compute.b for d in self.devices])

    def check_fits(self, num_experts: int, where: str | None = None) -> None:
        """Every expert needs at least one slot somewhere."""
        total = int(self.slots.sum())
        if total < num_experts:
            need = -(-num_experts // self.num_devices)
            raise InputError(f"the cluster has {total} expert slots in all, fewer than the {num_experts} experts "
                             f"to place: give each of its {self.num_devices} devices at least {need} "
                             f"(--slots {need + 1} leaves one spare each)", where)

    # --- links -------------------------------------------------------------------------
    def link_class(self, src: int, dst: int) -> str:
        return INTRA if self.devices[src].node == self.devices[dst].node else INTER

    def link(self, src: int, dst: int) -> Link:
        return self.pairs.get((src, dst)) or self.links[self.link_class(src, dst)]

    @cached_property
    def alpha(self) -> np.ndarray:
        """[G, G] latency in seconds of a message from row to column (0 on the diagonal)."""
        return self._matrix(lambda link: link.alpha)

    @cached_property
    def inv_beta(self) -> np.ndarray:
        """[G, G] seconds per byte from row to column (0 on the diagonal)."""
        return self._matrix(lambda link: 1.0 / link.beta)

    @cached_property
    def inter_mask(self) -> np.ndarray:
        """[G, G] True where the pair crosses nodes."""
        return self.node_of[:, None] != self.node_of[None, :]

    @cached_property
    def intra_mask(self) -> np.ndarray:
        """[G, G] True where two different devices share a node."""
        return ~self.inter_mask & ~np.eye(self.num_devices, dtype=bool)

    @cached_property
    def class_inv_beta(self) -> np.ndarray:
        """[2, G, G] `inv_beta` where the pair is inside one node (first) or crosses nodes (second),
        else 0: bytes times these are seconds split by link class (a 0/1 mask times inv_beta is
        exact, so the same numbers as masking the seconds, one product fewer). Read-only."""
        inter = self.inter_mask.astype(np.float64)
        out = np.stack([1.0 - inter, inter]) * self.inv_beta
        out.flags.writeable = False
        return out

    @cached_property
    def uniform_inv_beta(self) -> tuple[float, float] | None:
        """Seconds per byte inside a node and across nodes when every pair of each link class has
        the same bandwidth (presets and other nominal clusters; 0.0 for a class with no pairs),
        else None (profiled clusters): then a device's link time per class is its bytes times
        one number, and the estimator needs no [src, dst] matrix."""
        costs = []
        for mask in (self.intra_mask, self.inter_mask):
            values = np.unique(self.inv_beta[mask])
            if len(values) > 1:
                return None
            costs.append(float(values[0]) if len(values) else 0.0)
        return costs[0], costs[1]

    @cached_property
    def cheapest_inv_beta(self) -> tuple[np.ndarray, np.ndarray]:
        """Per device, seconds per byte of its cheapest link to or from another device inside its
        node and across nodes (inf where it has none): what the bounds charge each byte. Cached:
        judges and bounds ask for it on every plan, and it scans the [G, G] matrix. Read-only."""
        invb = np.minimum(self.inv_beta, self.inv_beta.T)
        out = (np.where(self.intra_mask, invb, np.inf).min(axis=1),
               np.where(self.inter_mask, invb, np.inf).min(axis=1))
        for a in out:
            a.flags.writeable = False
        return out

    def _matrix(self, value) -> np.ndarray:
        n = self.num_devices
        out = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    out[i, j] = value(self.link(i, j))
        return out

    def graph(self) -> nx.DiGraph:
        """The topology: devices as nodes, every directed pair as an edge with its link model."""
        g = nx.DiGraph(name=self.name)
        for d in self.devices:
            g.add_node(d.id, node=d.node, kind=d.kind, memory_bytes=d.memory_bytes, slots=d.slots,
                       a=d.compute.a, b=d.compute.b)
        for i in range(self.num_devices):
            for j in range(self.num_devices):
                if i != j:
                    link = self.link(i, j)
                    g.add_edge(i, j, cls=self.link_class(i, j), alpha=link.alpha, beta=link.beta,
                               override=(i, j) in self.pairs)
        return g

    # --- variants and files --------------------------------------------------------------
    def with_slots(self, slots: int) -> "Cluster":
        return replace(self, devices=tuple(replace(d, slots=slots) for d in self.devices))

    def compute_only(self) -> "Cluster":
        """This cluster with links that cost nothing: planning on it balances compute alone
        (what EPLB aims at), which suits inference and clusters whose links are never the limit."""
        free = Link(alpha=0.0, beta=1e30)
        return replace(self, name=f"{self.name} (compute only)", links={k: free for k in self.links}, pairs={})

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "expert": {"hidden": self.expert.hidden, "ffn": self.expert.ffn, "dtype": self.expert.dtype},
            "devices": [{"id": d.id, "node": d.node, "kind": d.kind, "memory_bytes": d.memory_bytes,
                         "slots": d.slots,
                         "compute": {"a": d.compute.a, "b": d.compute.b, "fit": d.compute.fit}}
                        for d in self.devices],
            "links": {k: {"alpha": v.alpha, "beta": v.beta} for k, v in self.links.items()},
            "pairs": [{"src": s, "dst": t, "alpha": v.alpha, "beta": v.beta}
                      for (s, t), v in sorted(self.pairs.items())],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, doc: Any, path: str | os.PathLike | None = None) -> "Cluster":
        check_schema(doc, SCHEMA, path, "cluster")
        try:
            return _parse(doc, path)
        except InputError:
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"malformed cluster: missing or mistyped field {exc}", path) from None

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Cluster":
        return cls.from_dict(read_json(path, "cluster"), path)


def _parse(doc: dict, path) -> Cluster:
    ex = doc["expert"]
    if ex.get("dtype") not in DTYPE_BYTES:
        raise InputError(f"expert dtype must be one of {sorted(DTYPE_BYTES)}, got {ex.get('dtype')!r}", path)
    expert = ExpertShape(whole_number(ex["hidden"], "expert.hidden", path, minimum=1, maximum=MAX_SIZE),
                         whole_number(ex["ffn"], "expert.ffn", path, minimum=1, maximum=MAX_SIZE), ex["dtype"])
    if not isinstance(doc["devices"], list) or not doc["devices"]:
        raise InputError("'devices' must be a non-empty list", path)
    if len(doc["devices"]) > MAX_DEVICES:
        raise InputError(f"{len(doc['devices'])} devices; at most {MAX_DEVICES} are supported", path)
    devices = []
    for i, d in enumerate(doc["devices"]):
        where = f"devices[{i}]"
        c = d["compute"]
        devices.append(Device(
            id=whole_number(d["id"], f"{where}.id", path),
            node=whole_number(d["node"], f"{where}.node", path),
            kind=str(d["kind"]),
            memory_bytes=whole_number(d["memory_bytes"], f"{where}.memory_bytes", path),
            slots=whole_number(d["slots"], f"{where}.slots", path, maximum=MAX_SLOTS),
            compute=ComputeModel(finite_number(c["a"], f"{where}.compute.a", path, minimum=0.0, maximum=MAX_SECONDS),
                                 finite_number(c["b"], f"{where}.compute.b", path, positive=True,
                                               maximum=MAX_SECONDS),
                                 dict(c.get("fit", {}))),
        ))
    links = {name: _link(v, f"links.{name}", path) for name, v in doc["links"].items()}
    pairs = {}
    if not isinstance(doc.get("pairs", []), list):
        raise InputError("'pairs' must be a list", path)
    for i, p in enumerate(doc.get("pairs", [])):
        key = (whole_number(p["src"], f"pairs[{i}].src", path), whole_number(p["dst"], f"pairs[{i}].dst", path))
        pairs[key] = _link(p, f"pairs[{i}]", path)
    provenance = doc.get("provenance", {})
    if not isinstance(provenance, dict):
        raise InputError("'provenance' must be an object", path)
    try:
        return Cluster(str(doc.get("name", "")), tuple(devices), expert, links, pairs, provenance)
    except InputError as exc:
        raise InputError(exc.problem, path) from None


def _link(v: dict, where: str, path) -> Link:
    return Link(finite_number(v["alpha"], f"{where}.alpha", path, minimum=0.0, maximum=MAX_SECONDS),
                finite_number(v["beta"], f"{where}.beta", path, minimum=1.0))  # bytes/s


def _validate(c: Cluster, path) -> None:
    ids = [d.id for d in c.devices]
    if ids != list(range(len(ids))):
        raise InputError(f"device ids must be 0..{len(ids) - 1} in order, got {ids}", path)
    if INTRA not in c.links:
        raise InputError("links must include the 'intra' (same node) class", path)
    if c.num_nodes > 1 and INTER not in c.links:
        raise InputError("devices span several nodes, so links must include the 'inter' class", path)
    unknown = set(c.links) - {INTRA, INTER}
    if unknown:
        raise InputError(f"unknown link classes {sorted(unknown)} (known: intra, inter)", path)
    for src, dst in c.pairs:
        for dev in (src, dst):
            if not 0 <= dev < len(ids):
                raise InputError(f"pair override ({src}, {dst}) names unknown device id {dev}", path)
        if src == dst:
            raise InputError(f"pair override ({src}, {dst}) links a device to itself", path)
    if sum(d.slots for d in c.devices) == 0:
        raise InputError("no device has an expert slot", path)

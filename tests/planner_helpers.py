"""Small clusters and loads for the planner tests (no /work/shared)."""

from __future__ import annotations

import numpy as np

from cost_models.cluster import INTER, INTRA, Cluster, ComputeModel, Device, ExpertShape, Link


def make_cluster(nodes: int = 1, per_node: int = 3, slots: int = 2, a: float = 0.0, b: float = 1e-6,
                 fast: bool = True, expert: ExpertShape = ExpertShape(64, 128, "bf16")) -> Cluster:
    """`fast`: links so fast that compute is all that counts (brute force knows the optimum then).
    `expert`: the default is light (communication is cheap); a real model's shape makes replica
    sync and the inter-node all-to-all weigh as much as compute."""
    intra = Link(0.0, 1e18) if fast else Link(8e-6, 230e9)
    inter = Link(0.0, 1e18) if fast else Link(20e-6, 22e9)
    devices = tuple(Device(n * per_node + i, n, "test", 2**34, slots, ComputeModel(a, b))
                    for n in range(nodes) for i in range(per_node))
    links = {INTRA: intra, INTER: inter} if nodes > 1 else {INTRA: intra}
    return Cluster("test", devices, expert, links)


def spread(load, sources: int, seed: int = 0) -> np.ndarray:
    """counts[source, expert] with the given expert totals, split unevenly over sources."""
    rng = np.random.default_rng(seed)
    load = np.asarray(load, dtype=np.int64)
    out = np.zeros((sources, len(load)), dtype=np.int64)
    for e, n in enumerate(load):
        out[:, e] = rng.multinomial(int(n), rng.dirichlet(np.ones(sources)))
    return out


def write_plan_inputs(directory, steps: int):
    """A 2-node, 4-device cluster.json and a `steps`-step, 2-layer trace.npz of skewed loads in
    `directory` (for the command tests); returns the directory."""
    from planner.trace import Trace
    make_cluster(nodes=2, per_node=2, slots=3, a=1e-5, fast=False).save(directory / "cluster.json")
    counts = np.stack([np.stack([spread([400, 100, 50, 30, 20, 900], 4, seed=10 * s + l) for l in range(2)])
                       for s in range(steps)])
    Trace(counts, top_k=1).save(directory / "trace.npz")
    return directory

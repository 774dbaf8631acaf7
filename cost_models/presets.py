"""Named clusters of published shape, for planning before (or without) profiling.

The figures are nominal, taken from vendor datasheets and the achieved bandwidths that NCCL
users commonly report; a profiled `cluster.json` always beats them. Each preset names its
sources in its provenance.
"""

from __future__ import annotations

import os
from typing import Callable

from cost_models.cluster import INTER, INTRA, Cluster, ComputeModel, Device, ExpertShape, Link
from cost_models.files import InputError

GiB = 2**30

# Share of peak dense throughput that an expert FFN's GEMMs reach (forward plus backward).
# Expert GEMMs are small and ragged; 50% of peak is a typical achieved figure on A100/H100.
GEMM_EFFICIENCY = 0.5


def _gpu_cluster(name: str, nodes: int, per_node: int, kind: str, memory: int, peak_flops: float,
                 launch_s: float, intra: Link, inter: Link, slots: int, expert: ExpertShape,
                 sources: list[str]) -> Cluster:
    compute = ComputeModel(a=launch_s, b=expert.flops_per_token / (peak_flops * GEMM_EFFICIENCY),
                           fit={"method": "nominal", "peak_flops": peak_flops,
                                "gemm_efficiency": GEMM_EFFICIENCY})
    devices = tuple(Device(id=n * per_node + i, node=n, kind=kind, memory_bytes=memory, slots=slots,
                           compute=compute) for n in range(nodes) for i in range(per_node))
    links = {INTRA: intra, INTER: inter} if nodes > 1 else {INTRA: intra}
    return Cluster(name, devices, expert, links, {},
                   {"source": "preset", "preset": name, "references": sources,
                    "note": "nominal figures; run `flexmoe profile` to measure a real cluster"})


def dgx_a100_2x8(slots: int = 2, expert: ExpertShape | None = None) -> Cluster:
    """2 nodes x 8 A100-SXM4-80GB, NVLink 3 inside a node, 8x HDR InfiniBand between nodes."""
    return _gpu_cluster(
        "dgx-a100-2x8", 2, 8, "A100-SXM4-80GB", 80 * GiB, 312e12, 40e-6,
        # NVLink 3: 600 GB/s per GPU both directions together, 300 GB/s each way; ~230 GB/s achieved.
        intra=Link(alpha=8e-6, beta=230e9),
        # One ConnectX-6 HDR 200 Gb/s (25 GB/s) NIC per GPU; ~22 GB/s achieved.
        inter=Link(alpha=20e-6, beta=22e9),
        slots=slots, expert=expert or ExpertShape(1024, 4096, "bf16"),
        sources=["NVIDIA A100 Tensor Core GPU datasheet (312 TFLOP/s dense BF16, NVLink 600 GB/s)",
                 "NVIDIA DGX A100 system architecture whitepaper (8x 200 Gb/s HDR InfiniBand)",
                 "nccl-tests on DGX A100: ~230 GB/s intra-node bus bandwidth"])


def dgx_h100_8x8(slots: int = 5, expert: ExpertShape | None = None) -> Cluster:
    """8 nodes x 8 H100-SXM5-80GB, NVLink 4 inside a node, 8x NDR InfiniBand between nodes."""
    return _gpu_cluster(
        "dgx-h100-8x8", 8, 8, "H100-SXM5-80GB", 80 * GiB, 989e12, 30e-6,
        # NVLink 4: 900 GB/s per GPU both directions together, 450 GB/s each way; ~370 GB/s achieved.
        intra=Link(alpha=6e-6, beta=370e9),
        # One ConnectX-7 NDR 400 Gb/s (50 GB/s) NIC per GPU; ~45 GB/s achieved.
        inter=Link(alpha=15e-6, beta=45e9),
        slots=slots, expert=expert or ExpertShape(7168, 2048, "bf16"),
        sources=["NVIDIA H100 Tensor Core GPU datasheet (989 TFLOP/s dense BF16, NVLink 900 GB/s)",
                 "NVIDIA DGX H100 user guide (8x ConnectX-7 400 Gb/s NDR InfiniBand)",
                 "DeepSeek-V3 technical report (256 routed experts, 7168 hidden, 2048 expert FFN)"])


def local_cpu(slots: int = 2, expert: ExpertShape | None = None, world_size: int = 2) -> Cluster:
    """`world_size` gloo processes on this host, with nominal speeds; profile for real ones."""
    expert = expert or ExpertShape(256, 1024, "fp32")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world_size
    except (ValueError, OSError, AttributeError):
        memory = 8 * GiB
    compute = ComputeModel(a=2e-4, b=expert.flops_per_token / 20e9,
                           fit={"method": "nominal", "flops_per_second": 20e9})
    devices = tuple(Device(i, 0, "cpu", memory, slots, compute) for i in range(world_size))
    return Cluster("local-cpu", devices, expert, {INTRA: Link(alpha=30e-6, beta=2e9)}, {},
                   {"source": "preset", "preset": "local-cpu",
                    "references": ["nominal: ~20 GFLOP/s per single-threaded process, ~2 GB/s gloo loopback"],
                    "note": "nominal figures; run `flexmoe profile` to measure this machine"})


PRESETS: dict[str, Callable[..., Cluster]] = {
    "local-cpu": local_cpu,
    "dgx-a100-2x8": dgx_a100_2x8,
    "dgx-h100-8x8": dgx_h100_8x8,
}


def preset(name: str, **kwargs) -> Cluster:
    try:
        build = PRESETS[name]
    except KeyError:
        raise InputError(f"unknown cluster preset {name!r} (known: {', '.join(PRESETS)})") from None
    return build(**kwargs)

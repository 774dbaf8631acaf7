"""The profiler: micro-benchmarks on the devices at hand, fitted into a `Cluster`.

Each rank times one expert FFN's forward+backward on several token counts (all ranks at once,
as in training, so shared resources are shared while measuring too) and rank pairs time a
ping-pong over message sizes. Rank 0 gathers everything, fits `a + b*n` per device and
`alpha + bytes/beta` per link class (and per pair on request) and builds the cluster.

Launch: under `torchrun` (RANK and WORLD_SIZE in the environment) every process profiles itself
with the ranks it was given, so a multi-node cluster profiles the same way as one host;
otherwise `world_size` processes are spawned here, gloo on 127.0.0.1 for CPUs (one thread each)
or NCCL for GPUs. torch is imported inside functions: the estimator and the planner import
`cost_models` and must stay torch-free.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cost_models.cluster import INTER, INTRA, Cluster, Device, ExpertShape
from cost_models.files import InputError
from cost_models.fit import fit_compute, fit_link
from cost_models.launch import free_port, init_distributed, spawn_local, under_torchrun

KiB, MiB = 2**10, 2**20
STATISTICS = {"median": np.median, "min": np.min}
SIZES = tuple(2**k for k in range(10, 27))  # 1 KiB .. 64 MiB
QUICK_SIZES = (1 * KiB, 64 * KiB, 1 * MiB, 8 * MiB)
TOKENS = {"cpu": (1, 8, 32, 128, 256, 512, 1024, 2048, 4096),
          "cuda": (1, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536)}
QUICK_TOKENS = {"cpu": (8, 64, 256), "cuda": (64, 1024, 8192)}


@dataclass
class ProfileOptions:
    """What to measure and how. `world_size` is ignored under torchrun (the launcher decides)."""

    world_size: int = 2
    device: str = "auto"  # cpu | cuda | auto (cuda when available)
    expert: ExpertShape = field(default_factory=lambda: ExpertShape(256, 1024, "fp32"))
    slots: int = 2
    quick: bool = False
    all_pairs: bool = False  # time every pair and write per-pair overrides
    repeats: int = 0  # 0: 5 (3 in quick mode)
    timeout_s: float = 600.0
    progress: bool = True
    # Per point, over the repeats: "median" for a quiet cluster; "min" where other programs share
    # the cores and steal time in bursts (the least disturbed run is the reproducible one).
    statistic: str = "median"
    name: str = ""


# ----------------------------------------------------------------------------- launching
def resolve_device(device: str) -> tuple[str, str]:
    """(device type, backend), or an InputError saying what is missing."""
    import torch
    import torch.distributed as dist

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but CUDA is not available here "
                             f"(torch {torch.__version__}); use --device cpu")
        if not dist.is_nccl_available():
            raise InputError("--device cuda needs the NCCL backend, which this torch build lacks")
        return "cuda", "nccl"
    if not dist.is_available() or not dist.is_gloo_available():
        raise InputError("profiling CPUs needs torch.distributed with the gloo backend, which this torch build lacks")
    return "cpu", "gloo"




def profile(opts: ProfileOptions) -> Cluster | None:
    """Profile and return the cluster (None on ranks other than 0 under torchrun)."""
    if opts.expert.dtype not in ("fp32", "fp16", "bf16"):
        raise InputError(f"the profiler times fp32, fp16 or bf16 experts, not {opts.expert.dtype}")
    if opts.slots < 1:
        raise InputError(f"--slots must be >= 1, got {opts.slots}")
    if opts.statistic not in STATISTICS:
        raise InputError(f"--statistic must be one of {', '.join(STATISTICS)}, got {opts.statistic!r}")
    device, backend = resolve_device(opts.device)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world < 2:
            raise InputError("profiling links needs at least 2 ranks (WORLD_SIZE is 1)")
        meas = _worker_body(int(os.environ["RANK"]), world, None, device, backend, opts, launcher="torchrun")
        return build_cluster(meas, opts) if meas is not None else None
    if opts.world_size < 2:
        raise InputError(f"--world-size must be >= 2 to measure links, got {opts.world_size}")
    if device == "cuda":
        import torch
        if torch.cuda.device_count() < opts.world_size:
            raise InputError(f"--world-size {opts.world_size} needs as many GPUs, "
                             f"this host has {torch.cuda.device_count()}; use torchrun for several hosts")
    return build_cluster(_spawn(opts, device, backend), opts)


def _spawn(opts: ProfileOptions, device: str, backend: str) -> dict:
    """Run the workers as local processes; rank 0 hands its measurements back through a temp file."""
    fd, result = tempfile.mkstemp(prefix="flexmoe-profile-", suffix=".json")
    os.close(fd)
    try:
        spawn_local(_spawned_worker, (opts.world_size, free_port(), device, backend, opts, result),
                    opts.world_size, opts.timeout_s + 60, "profiling")
        with open(result) as f:
            return json.load(f)
    finally:
        os.unlink(result)




def _spawned_worker(rank: int, world: int, port: int, device: str, backend: str, opts: ProfileOptions,
                    result: str) -> None:
    meas = _worker_body(rank, world, port, device, backend, opts, launcher="spawn")
    if meas is not None:
        with open(result, "w") as f:
            json.dump(meas, f)


def _worker_body(rank: int, world: int, port: int | None, device: str, backend: str, opts: ProfileOptions,
                 launcher: str) -> dict | None:
    import torch
    import torch.distributed as dist

    if device == "cpu":
        torch.set_num_threads(1)  # one core per rank, as a CPU "device"
        dev = torch.device("cpu")
    else:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    init_distributed(rank, world, port, backend, opts.timeout_s)
    try:
        meas = _measure(rank, world, dev, opts)
        meas["launcher"], meas["backend"] = launcher, backend
        return meas if rank == 0 else None
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- measuring
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ExpertFFN:
    """One expert's weights (two linear layers with biases, GELU) and its forward+backward step,
    the operation the compute model describes. The validation benchmark uses it too."""

    def __init__(self, expert: ExpertShape, device, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, TORCH_DTYPES[expert.dtype])
        scale = expert.hidden ** -0.5

        def param(*shape):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

        self.w1, self.b1 = param(expert.hidden, expert.ffn), param(expert.ffn)
        self.w2, self.b2 = param(expert.ffn, expert.hidden), param(expert.hidden)
        self.params = (self.w1, self.b1, self.w2, self.b2)
        self.dtype, self.device, self.hidden = dtype, device, expert.hidden
        self._x = self._g = self._flush = None

    def forward(self, x):
        import torch.nn.functional as F

        return F.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def step(self, n: int) -> float:
        """Seconds of forward plus backward on n tokens (gradients for inputs and weights).

        In a layer, other experts, the all-to-alls and the rest of the model run before an
        expert's forward and between it and its backward, so its weights and activations are
        not in cache: the caches are flushed before each half and only the halves are timed.
        (On this project's 2-core VM, back to back was 15-30% faster at 128 tokens, the same at
        2048: it mostly raises `a`.) Inputs and output gradients come from buffers made outside
        the timing, as in a layer they come from the all-to-all.
        """
        import torch

        if self._x is None or self._x.shape[0] < n:
            self._x = torch.randn(n, self.hidden, device=self.device, dtype=self.dtype)
            self._g = torch.randn(n, self.hidden, device=self.device, dtype=self.dtype)
        x = self._x[:n].detach().requires_grad_()
        self._flush_caches()
        out = []
        seconds = timed(lambda: out.append(self.forward(x)), self.device)
        self._flush_caches()
        seconds += timed(lambda: out[0].backward(self._g[:n]), self.device)
        for p in self.params:
            p.grad = None
        return seconds

    def _flush_caches(self) -> None:
        """Write a buffer larger than the caches a layer's other work would sweep (64 MiB)."""
        import torch

        if self._flush is None:
            self._flush = torch.zeros(16 * MiB, dtype=torch.float32, device=self.device)
        self._flush.add_(1.0)


def timed(fn, device) -> float:
    """Seconds `fn()` takes: CUDA events on a GPU, the wall clock on a CPU."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def cpu_pressure() -> float | None:
    """Linux's share of the last 10 s in which runnable tasks waited for a CPU (percent), or None.
    Recorded with CPU measurements: other programs on the cores change what a profile means."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def _pairs(hosts: list[str], all_pairs: bool) -> list[tuple[int, int]]:
    """Every pair, or rank 0 with every other rank plus, if rank 0 has its host to itself, one
    pair inside another host: enough to see every link class."""
    world = len(hosts)
    if all_pairs:
        return [(i, j) for i in range(world) for j in range(i + 1, world)]
    pairs = [(0, j) for j in range(1, world)]
    if hosts.count(hosts[0]) == 1:
        for h in dict.fromkeys(hosts):
            ranks = [r for r in range(world) if hosts[r] == h]
            if len(ranks) > 1:
                pairs.append((ranks[0], ranks[1]))
                break
    return pairs


class Exchanger:
    """Times a link the two ways a layer uses it, both ranks of a pair sending and receiving
    `size` bytes at once: through `all_to_all_single` with uneven splits (nothing to itself, `size`
    to the peer), which is what the link model is fitted from, and as a plain point-to-point
    exchange (`batch_isend_irecv`), kept for reference. The estimator charges links per
    all-to-all phase, so the all-to-all's own overhead belongs in the fit (on gloo loopback on
    this project's 2-core VM: 180 us against 115 us at 1 KiB, about the same at 4 MiB). Both ranks
    move data at once: a ping-pong would also time the idle side's wake-up (about 2 ms with gloo on a
    loaded host) and miss that a loopback "link" shares its bandwidth between directions."""

    def __init__(self, max_bytes: int, dev):
        import torch

        self.out = torch.empty(max_bytes, dtype=torch.uint8, device=dev)
        self.inp = torch.empty(max_bytes, dtype=torch.uint8, device=dev)
        self.dev = dev

    def _done(self, t0: float) -> float:
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter() - t0

    def seconds(self, peer: int, size: int) -> float:
        """Point-to-point exchange with global rank `peer`."""
        import torch.distributed as dist

        ops = [dist.P2POp(dist.isend, self.out[:size], peer), dist.P2POp(dist.irecv, self.inp[:size], peer)]
        t0 = time.perf_counter()
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return self._done(t0)

    def a2a_seconds(self, group, me: int, size: int) -> float:
        """All-to-all in a two-rank `group` where this rank has index `me`."""
        import torch.distributed as dist

        splits = [size, size]
        splits[me] = 0
        t0 = time.perf_counter()
        dist.all_to_all_single(self.inp[:size], self.out[:size], splits, splits, group=group)
        return self._done(t0)


def describe_device(dev) -> tuple[str, int]:
    """(name, memory in bytes) of a torch device; for a CPU, the whole host's memory."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev), int(torch.cuda.get_device_properties(dev).total_memory)
    return _cpu_name(), _host_memory()


def measurements(rank: int, world: int, dev, compute: list, links: list, tokens, sizes, repeats: int,
                 pressure: float | None, p2p: list | None = None) -> dict:
    """Gather every rank's samples into the record `build_cluster` fits (a collective call)."""
    import torch
    import torch.distributed as dist

    name, memory = describe_device(dev)
    mine = {"rank": rank, "host": socket.gethostname(), "device": name, "memory_bytes": memory,
            "compute": compute, "links": links, "p2p": p2p or []}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return {"ranks": gathered, "tokens": list(tokens), "sizes": list(sizes), "repeats": repeats,
            "device_type": dev.type, "torch": torch.__version__,
            "cpu_pressure_pct": {"before": pressure, "after": cpu_pressure()}}


def _measure(rank: int, world: int, dev, opts: ProfileOptions) -> dict:
    import torch.distributed as dist
    from tqdm import tqdm

    tokens = (QUICK_TOKENS if opts.quick else TOKENS)[dev.type]
    sizes = QUICK_SIZES if opts.quick else SIZES
    repeats = opts.repeats or (3 if opts.quick else 5)
    stat = STATISTICS[opts.statistic]
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    pairs = _pairs(hosts, opts.all_pairs)
    pressure = cpu_pressure()
    bar = tqdm(total=len(tokens) + len(pairs) * len(sizes), desc="profile", unit="bench",
               disable=rank != 0 or not opts.progress, file=sys.stderr)

    # Compute: every rank at once, `repeats` rounds after one warm-up.
    ffn = ExpertFFN(opts.expert, dev, seed=rank)
    dist.barrier()
    samples = {n: [] for n in tokens}
    for n in tokens:
        ffn.step(n)  # warm-up
    for _ in range(repeats):  # rounds over all sizes: a burst of outside load hits every size alike
        for n in tokens:
            samples[n].append(ffn.step(n))
        bar.update(len(tokens) / repeats)
    compute = [[n, float(stat(samples[n]))] for n in tokens]
    dist.barrier()

    # Links: one pair at a time, in a two-rank group (every rank takes part in making groups).
    links, p2p = [], []
    ex = Exchanger(max(sizes), dev)
    for i, j in pairs:
        group = dist.new_group([i, j]) if world > 2 else None
        if rank in (i, j):
            peer, me = (j, 0) if rank == i else (i, 1)
            for size in sizes:
                ex.seconds(peer, size), ex.a2a_seconds(group, me, size)  # warm-up (also connects)
                reps = repeats * (4 if size <= 64 * KiB else 1)
                times = [(ex.a2a_seconds(group, me, size), ex.seconds(peer, size)) for _ in range(reps)]
                if rank == i:
                    a2a, pt = np.array(times).T
                    links.append([i, j, size, float(stat(a2a))])
                    p2p.append([i, j, size, float(stat(pt))])
        dist.barrier()
        bar.update(len(sizes))
    bar.close()
    return measurements(rank, world, dev, compute, links, tokens, sizes, repeats, pressure, p2p)


# ----------------------------------------------------------------------------- fitting
def build_cluster(meas: dict, opts: ProfileOptions) -> Cluster:
    """Fit the measurements into a Cluster (pure numpy; testable without torch)."""
    ranks = sorted(meas["ranks"], key=lambda r: r["rank"])
    hosts = list(dict.fromkeys(r["host"] for r in ranks))
    node_of = [hosts.index(r["host"]) for r in ranks]
    devices = _fit_devices(meas, opts, ranks, node_of)
    links, link_fits, per_pair = _fit_links(ranks, node_of)
    p2p_fits = _fit_p2p(ranks, node_of)
    pairs, pair_fits = {}, {}
    if opts.all_pairs:
        for (i, j), pts in sorted(per_pair.items()):
            link, fit = fit_link(*np.array(pts).T)
            pairs[(i, j)] = pairs[(j, i)] = link
            pair_fits[f"{i}-{j}"] = fit
    provenance = _provenance(meas, opts, ranks, hosts, link_fits, p2p_fits)
    if pair_fits:
        provenance["pair_fits"] = pair_fits
    name = opts.name or f"profiled-{hosts[0]}" + (f"+{len(hosts) - 1}" if len(hosts) > 1 else "")
    return Cluster(name, tuple(devices), opts.expert, links, pairs, provenance)


def _fit_devices(meas: dict, opts: ProfileOptions, ranks: list[dict], node_of: list[int]) -> list[Device]:
    """Each rank's device with its fitted compute model; on CPU a host's memory is split among its ranks."""
    per_host = {h: sum(r["host"] == h for r in ranks) for h in {r["host"] for r in ranks}}
    devices = []
    for r in ranks:
        n, t = np.array(r["compute"], dtype=np.float64).T
        model = fit_compute(n, t)
        model.fit.update({"statistic": f"{opts.statistic} of {meas['repeats']} rounds over all sizes, after a warm-up",
                          "operation": "expert FFN forward + backward (GELU, weight and input gradients), "
                                       "caches flushed before each"})
        memory = r["memory_bytes"]
        if meas["device_type"] == "cpu":  # processes on one host share its memory
            memory //= per_host[r["host"]]
        devices.append(Device(r["rank"], node_of[r["rank"]], r["device"], int(memory), opts.slots, model))
    return devices


def _fit_links(ranks: list[dict], node_of: list[int]):
    """The all-to-all link model per class (intra-, inter-node), its fits, and the samples per pair."""
    samples = {INTRA: [], INTER: []}
    per_pair = {}
    for r in ranks:
        for i, j, size, seconds in r["links"]:
            cls = INTRA if node_of[i] == node_of[j] else INTER
            samples[cls].append((size, seconds))
            per_pair.setdefault((i, j), []).append((size, seconds))
    links, link_fits = {}, {}
    for cls, pts in samples.items():
        if pts:
            links[cls], link_fits[cls] = fit_link(*np.array(pts).T)
    if INTRA not in links:
        # Every node has a single device: no pair is intra-node, so the class is never used.
        links[INTRA] = links[INTER]
        link_fits[INTRA] = {"note": "no two devices share a node; copied from 'inter', never used"}
    return links, link_fits, per_pair


def _fit_p2p(ranks: list[dict], node_of: list[int]) -> dict:
    """Point-to-point (batch_isend_irecv) fits per class, recorded in the provenance only."""
    p2p_samples = {INTRA: [], INTER: []}
    for r in ranks:
        for i, j, size, seconds in r.get("p2p", []):
            p2p_samples[INTRA if node_of[i] == node_of[j] else INTER].append((size, seconds))
    p2p_fits = {}
    for cls, pts in p2p_samples.items():
        if pts:
            link, fit = fit_link(*np.array(pts).T)
            p2p_fits[cls] = {"alpha": link.alpha, "beta": link.beta, **fit}
    return p2p_fits


def _provenance(meas: dict, opts: ProfileOptions, ranks: list[dict], hosts: list[str],
                link_fits: dict, p2p_fits: dict) -> dict:
    """Where and how the measurements were taken, written into the cluster file."""
    return {
        "source": "profile", "host": hosts[0], "hosts": hosts,
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": meas["torch"], "python": platform.python_version(), "numpy": np.__version__,
        "platform": platform.platform(), "backend": meas["backend"], "launcher": meas["launcher"],
        "world_size": len(ranks), "devices": [r["device"] for r in ranks], "quick": opts.quick,
        "statistic": opts.statistic,
        "what": {"expert": asdict(opts.expert), "tokens": meas["tokens"], "message_bytes": meas["sizes"],
                 "repeats": meas["repeats"], "pairs": sorted({f"{i}-{j}" for r in ranks for i, j, *_ in r["links"]}),
                 "link_timing": f"all_to_all_single in a two-rank group, each rank sending the size to the other "
                                f"at once, {opts.statistic}; p2p_fits: the same with batch_isend_irecv"},
        "link_fits": link_fits, "p2p_fits": p2p_fits, "cpu_pressure_pct": meas.get("cpu_pressure_pct"),
    }

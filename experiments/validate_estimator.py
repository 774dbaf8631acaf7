"""Does the estimator predict real MoE steps? Replay skewed loads through the layer that trains.

World size 2, gloo on loopback (or NCCL on GPUs), one thread per process. For each load shape
the processes replay the case's counts `[source, expert]` through the real path: the public
`runtime.layer.FlexMoE` layer under `FlexMoERuntime` with the case's placement and shares
(`experiments.layer_replay`), so each step is what `flexmoe train` runs: the counts all-gather,
routing by `cost_models.routing`, the dispatch all-to-all with uneven splits, the experts in
their slots, the combine, the backward through all of it, then `finish_step` (replicas'
gradients to owners, the owners' AdamW, weights back). The step time is the slowest rank's,
summarised over the timed steps (median, or min); each row also keeps what the layer saw (the
counts it gathered, the shares it used, the tokens each device's experts computed).

Two predictions, both `estimate(cluster, counts, x, share, owner).step_time`: one on the given
(profiled) cluster, and one on a cluster fitted from the profiler's own micro-benchmarks run
between the steps. On a host whose cores other programs share, the machine's speed drifts
between a profile and a later validation; the second prediction takes that drift out and
tests the model itself. Nothing measured in the steps feeds either prediction.

    python -m experiments.validate_estimator -c cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from cost_models.cluster import Cluster
from cost_models.estimator import estimate
from cost_models.routing import apportion
from cost_models.files import InputError
from planner.plan import static_layer

WORLD = 2


@dataclass
class Case:
    """One load shape: counts[source, expert] and a placement as [E, G] matrices."""

    name: str
    counts: np.ndarray
    x: np.ndarray
    share: np.ndarray
    owner: np.ndarray | None


def cases(num_experts: int = 8, tokens: int = 2048) -> list[Case]:
    """Uniform, zipf, one hot expert, a lopsided source, and the hot expert replicated."""
    if num_experts < 2 or num_experts % WORLD or tokens < 1:
        raise InputError(f"the validation needs an even number of experts (>= 2) and tokens >= 1, "
                         f"got {num_experts} and {tokens}")
    e = num_experts
    static = static_layer(e, np.full(WORLD, e // WORLD))
    x, share, owner = static.replicas(), static.shares(), static.owner
    zipf = 1.0 / np.arange(1, e + 1) ** 1.2
    hot = np.full(e, 0.4 / (e - 1))
    hot[0] = 0.6
    remote_heavy = np.where(np.arange(e) >= e // 2, 0.8 / (e // 2), 0.2 / (e - e // 2))
    out = [
        Case("uniform", np.stack([apportion(tokens, np.ones(e))] * WORLD), x, share, None),
        Case("zipf-1.2", np.stack([apportion(tokens, zipf)] * WORLD), x, share, None),
        Case("one-hot-60%", np.stack([apportion(tokens, hot)] * WORLD), x, share, None),
        Case("source-skew", np.stack([apportion(tokens, remote_heavy), apportion(tokens, np.ones(e))]), x, share, None),
    ]
    # The hot expert gets a second replica on device 1 and the shares that balance the devices.
    counts = np.stack([apportion(tokens, hot)] * WORLD)
    totals = counts.sum(axis=0)
    x2, share2 = x.copy(), share.copy()
    x2[0, 1] = True
    load0 = totals[x[:, 0]].sum()  # device 0's tokens before the split
    load1 = totals[x[:, 1]].sum()
    s1 = np.clip((load0 - load1) / (2 * totals[0]), 0.0, 1.0)
    share2[0, 0], share2[0, 1] = 1.0 - s1, s1
    out.append(Case("one-hot, replicated", counts, x2, share2, owner))
    return out


# ----------------------------------------------------------------------------- the workers
def _worker(rank: int, port: int | None, cluster_doc: dict, case_docs: list[dict], steps: int, warmup: int,
            device: str, backend: str, timeout_s: float, statistic: str, result: str) -> None:
    """One rank: replay every case through the real layer, interleaved with the profiler's
    micro-benchmarks; rank 0 writes the steps' times, the phases and the calibration to `result`."""
    import torch.distributed as dist

    from cost_models.launch import init_distributed
    from experiments.layer_replay import LayerReplay

    dev = _device(device, rank)
    init_distributed(rank, WORLD, port, backend, timeout_s)
    try:
        cluster = Cluster.from_dict(cluster_doc)
        replays = [LayerReplay(rank, WORLD, cluster, doc, dev) for doc in case_docs]
        calibration = _Calibration(rank, cluster, dev)
        times, phases = _rounds(replays, calibration, steps, warmup, dev)
        rows = _gather_rows(case_docs, replays, times, phases)
        meas = calibration.measurements(steps, statistic)
        if rank == 0:
            meas["launcher"], meas["backend"] = "validate (interleaved with the steps)", backend
            with open(result, "w") as f:
                json.dump({"rows": rows, "calibration": meas}, f)
    finally:
        dist.destroy_process_group()


def _device(kind: str, rank: int):
    """This rank's device; one thread per process on CPUs, as the profiler measured."""
    import torch

    if kind == "cpu":
        torch.set_num_threads(1)
        return torch.device("cpu")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _rounds(replays: list, calibration: "_Calibration", steps: int, warmup: int, dev):
    """Round-robin over the cases, then the micro-benchmarks, so a burst of load from other
    programs hits them all alike. Returns per case the slowest rank's step seconds and this
    rank's seconds per phase, per timed step."""
    times = [[] for _ in replays]
    phases = [[] for _ in replays]
    for i in range(warmup + steps):
        for replay, out, ph in zip(replays, times, phases):
            t, p = _timed_step(replay, dev)
            if i >= warmup:
                out.append(t)
                ph.append(p)
        calibration.round(timed=i >= warmup)
    return times, phases


def _timed_step(replay, dev) -> tuple[float, list[float]]:
    """(the step's seconds on the slowest rank: the step ends when it does, this rank's phases)."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    ph = replay.step()
    t = torch.tensor([sum(ph[:3])], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t), ph


def _gather_rows(case_docs: list[dict], replays: list, times: list, phases: list) -> list[dict]:
    """Per case: the step times, every rank's phases, and what the layer saw on every rank (collective)."""
    import torch.distributed as dist

    every = [None] * WORLD
    dist.all_gather_object(every, [phases, [r.seen() for r in replays]])
    return [{"name": d["name"], "times_s": t, "phases_s": [every[r][0][k] for r in range(WORLD)],
             "seen": [every[r][1][k] for r in range(WORLD)]}
            for k, (d, t) in enumerate(zip(case_docs, times))]


class _Calibration:
    """The profiler's micro-benchmarks, repeated in the same rounds as the steps: a prediction
    from them compares model and steps under the same outside load (this host is shared)."""

    def __init__(self, rank: int, cluster: Cluster, dev):
        from cost_models.profiler import SIZES, TOKENS, Exchanger, ExpertFFN, cpu_pressure

        self.rank, self.dev, self.sizes, self.tokens = rank, dev, SIZES, TOKENS[dev.type]
        self.pressure = cpu_pressure()
        self.ffn, self.ex = ExpertFFN(cluster.expert, dev, seed=1000 + rank), Exchanger(max(SIZES), dev)
        for n in self.tokens:
            self.ffn.step(n)
        self.comp, self.link = [], []

    def round(self, timed: bool) -> None:
        import torch.distributed as dist

        dist.barrier()
        c = [self.ffn.step(n) for n in self.tokens]
        dist.barrier()
        ln = [self.ex.a2a_seconds(None, self.rank, size) for size in self.sizes]
        if timed:
            self.comp.append(c)
            self.link.append(ln)

    def measurements(self, steps: int, statistic: str) -> dict:
        """The profiler's measurement document, as `build_cluster` takes it (collective; rank 0's)."""
        from cost_models.profiler import STATISTICS, measurements

        stat = STATISTICS[statistic]
        comp = [[n, float(stat(t))] for n, t in zip(self.tokens, np.array(self.comp).T)]
        link = [[0, 1, size, float(stat(t))] for size, t in zip(self.sizes, np.array(self.link).T)]
        return measurements(self.rank, WORLD, self.dev, comp, link if self.rank == 0 else [], self.tokens,
                            self.sizes, steps, self.pressure)


# ----------------------------------------------------------------------------- driver
def validate(cluster: Cluster, *, num_experts: int = 8, tokens: int = 2048, steps: int = 15, warmup: int = 3,
             timeout_s: float = 600.0, statistic: str | None = None) -> list[dict]:
    """Run every case on WORLD local processes; rows of (shape, predicted, measured, relative error).

    The measured step is the slowest rank's, summarised over the timed steps by the statistic the
    cluster was profiled with (so both sides of the comparison are measured alike)."""
    from cost_models.profiler import STATISTICS, ProfileOptions, build_cluster, cpu_pressure

    statistic, device, backend = _check(cluster, statistic)
    all_cases = cases(num_experts, tokens)
    pressure = cpu_pressure()
    got = _run_workers(cluster, all_cases, steps, warmup, device, backend, timeout_s, statistic)
    pressures = [pressure, cpu_pressure()]
    same_time = build_cluster(got["calibration"], ProfileOptions(expert=cluster.expert, slots=int(cluster.slots.max()),
                                                                 statistic=statistic, name="interleaved"))
    return [_row(c, m, cluster, same_time, STATISTICS[statistic], statistic, pressures)
            for c, m in zip(all_cases, got["rows"])]


def _check(cluster: Cluster, statistic: str | None) -> tuple[str, str, str]:
    """(statistic, device, backend) for this cluster, or an InputError naming what does not fit."""
    from cost_models.profiler import STATISTICS, resolve_device

    statistic = statistic or cluster.provenance.get("statistic", "median")
    if statistic not in STATISTICS:
        raise InputError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if cluster.num_devices != WORLD:
        raise InputError(f"validation runs on {WORLD} local devices; the cluster has {cluster.num_devices}")
    if cluster.expert.dtype != "fp32":
        raise InputError(f"the runtime's experts train in fp32; the cluster was profiled with "
                         f"{cluster.expert.dtype} experts (profile with --dtype fp32 to validate)")
    kind = "cuda" if cluster.provenance.get("backend") == "nccl" else "cpu"
    device, backend = resolve_device(kind)
    if device == "cuda":
        import torch
        if torch.cuda.device_count() < WORLD:
            raise InputError(f"the validation needs {WORLD} GPUs on this host, it has {torch.cuda.device_count()}")
    return statistic, device, backend


def _run_workers(cluster: Cluster, all_cases: list[Case], steps: int, warmup: int, device: str, backend: str,
                 timeout_s: float, statistic: str) -> dict:
    """Spawn the WORLD workers and return what rank 0 wrote."""
    from cost_models.launch import free_port, spawn_local

    docs = [{"name": c.name, "counts": c.counts.tolist(), "x": c.x.tolist(), "share": c.share.tolist(),
             "owner": None if c.owner is None else [int(o) for o in c.owner]} for c in all_cases]
    fd, result = tempfile.mkstemp(prefix="flexmoe-validate-", suffix=".json")
    os.close(fd)
    try:
        spawn_local(_worker, (free_port(), cluster.to_dict(), docs, steps, warmup, device, backend, timeout_s,
                              statistic, result), WORLD, timeout_s, "validation")
        with open(result) as f:
            return json.load(f)
    finally:
        os.unlink(result)


def _row(c: Case, m: dict, cluster: Cluster, same_time: Cluster, stat, statistic: str, pressures: list) -> dict:
    """One output row: the two predictions, the measured step, the phases, what the layer saw."""
    from experiments.layer_replay import PHASES

    b = estimate(cluster, c.counts, c.x, c.share, c.owner)
    b2 = estimate(same_time, c.counts, c.x, c.share, c.owner)
    g = b.straggler
    measured = float(stat(m["times_s"]))
    return {"shape": c.name, "predicted_s": b.step_time, "measured_s": measured,
            "rel_error": b.step_time / measured - 1.0, "statistic": statistic, "balance": b.balance,
            "predicted_interleaved_s": b2.step_time, "rel_error_interleaved": b2.step_time / measured - 1.0,
            "interleaved_cluster": same_time.to_dict(), "cpu_pressure_pct": pressures,
            "compute_s": float(b.compute[g]), "a2a_s": float(b.a2a[g]), "sync_s": float(b.sync[g]),
            "phases_ms": {r: {p: round(float(v) * 1e3, 2) for p, v in
                              zip(PHASES, stat(np.array(m["phases_s"][r]), axis=0))} for r in range(WORLD)},
            "seen": _seen(m["seen"]),
            "spread_s": [float(np.percentile(m["times_s"], 25)), float(np.percentile(m["times_s"], 75))]}


def _seen(per_rank: list[dict]) -> dict:
    """What the real layer saw on the last step: the counts it gathered (rank 0's copy, every rank
    gathers the same), the shares it dispatched with, and `served[expert][device]`, the tokens each
    device's experts computed."""
    return {"counts": per_rank[0]["counts"], "share": per_rank[0]["share"],
            "served": np.array([r["served"] for r in per_rank]).T.tolist()}


def table(rows: list[dict]) -> str:
    """Predicted (from cluster.json, and from the micro-benchmarks interleaved with the steps),
    measured, relative errors; the prediction's straggler breakdown."""
    lines = [f"{'shape':<20} {'bal':>4} {'pred ms':>8} {'(compute':>9} {'a2a':>5} {'sync)':>5} {'err':>7} "
             f"{'pred* ms':>8} {'err*':>7} {'measured ms':>11} {'(p25-p75)':>13}"]
    if rows:
        before, after = rows[0]["cpu_pressure_pct"]
        lines.insert(0, f"measured: slowest rank's step, {rows[0]['statistic']} over the timed steps; "
                        f"CPU pressure (some, avg10) {before}% before, {after}% after")
    for r in rows:
        lo, hi = r["spread_s"]
        lines.append(f"{r['shape']:<20} {r['balance']:>4.2f} {r['predicted_s'] * 1e3:>8.1f} "
                     f"{r['compute_s'] * 1e3:>9.1f} {r['a2a_s'] * 1e3:>5.1f} {r['sync_s'] * 1e3:>5.1f} "
                     f"{r['rel_error'] * 100:>6.1f}% {r['predicted_interleaved_s'] * 1e3:>8.1f} "
                     f"{r['rel_error_interleaved'] * 100:>6.1f}% {r['measured_s'] * 1e3:>11.1f} "
                     f"{f'{lo * 1e3:.1f}-{hi * 1e3:.1f}':>13}")
    if rows:
        worst = max(abs(r["rel_error"]) for r in rows)
        worst2 = max(abs(r["rel_error_interleaved"]) for r in rows)
        lines.append(f"worst relative error {worst * 100:.1f}% from cluster.json, {worst2 * 100:.1f}% (*) from the "
                     f"same micro-benchmarks run between the steps (goal: within 20%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--cluster", required=True, help="a profiled cluster.json with 2 devices")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048, help="token-slots per source per step")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--statistic", choices=("median", "min"), help="default: the cluster's profiling statistic")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        rows = validate(Cluster.load(args.cluster), num_experts=args.experts, tokens=args.tokens, steps=args.steps,
                        statistic=args.statistic)
    except InputError as exc:
        print(f"validate_estimator: error: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        from cost_models.files import write_json_atomic
        write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

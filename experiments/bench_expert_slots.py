"""Benchmark: one rank's expert slots, forward+backward per step, one slot at a time against all slots
from one `unbind` (`ExpertSlots.run_slots`). Prints a table (not a timed test).

Indexing a slot as `t[slot]` makes autograd zero-fill a gradient the size of the whole stacked tensor
for every slot used; one `unbind` per step gives each slot its own gradient slice. Peak memory is
that of the tensors one step creates (weights and inputs excluded), tracked op by op, CPU or CUDA.

    .venv/bin/python experiments/bench_expert_slots.py [--slots 8] [--d 256] [--f 1024] [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.experts import SlotStore, init_experts  # noqa: E402


def one_at_a_time(store, xs):
    """The path before `run_slots`: each slot's weights indexed as `t[slot]`."""
    return [functional_call(store.template, {n: t[s] for n, t in zip(store.names, store.stacked)}, (x,))
            for s, x in enumerate(xs)]


def from_one_unbind(store, xs):
    return store.run_slots(list(enumerate(xs)))


def _step(path, store, xs) -> float:
    store.zero_grad()
    t0 = time.perf_counter()
    sum(y.sum() for y in path(store, xs)).backward()
    return time.perf_counter() - t0


def measure(paths: dict, store, xs, repeats: int) -> dict:
    """Per path: median seconds per step (the paths interleaved, as this machine's speed drifts),
    peak MiB of the tensors one step creates, and the gradients it leaves."""
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, path in paths.items():
            times[name].append(_step(path, store, xs))
    out = {}
    for name, path in paths.items():
        store.zero_grad()
        peak = _peak_bytes(lambda: sum(y.sum() for y in path(store, xs)).backward())
        out[name] = (float(np.median(times[name])), peak / 2 ** 20, [t.grad.clone() for t in store.stacked])
    return out


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created by torch ops while active, and their peak (CPU or CUDA)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op: no new storage
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t.untyped_storage(), self._freed, n)
        return out


def _peak_bytes(fn) -> float:
    """Peak bytes held by the tensors `fn` creates (inputs and weights not counted)."""
    with _LiveBytes() as mode:
        fn()
    return float(mode.peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--f", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per slot")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    store = SlotStore(args.d, args.f, np.arange(args.slots))
    for s, vec in enumerate(init_experts(args.slots, args.d, args.f, torch.Generator().manual_seed(0))):
        store.load_flat(s, vec)
    xs = [torch.randn(args.tokens, args.d) for _ in range(args.slots)]
    rows = measure({"t[slot] per slot": one_at_a_time, "one unbind": from_one_unbind}, store, xs, args.repeats)
    print(f"slots={args.slots} d={args.d} f={args.f} tokens/slot={args.tokens} threads={torch.get_num_threads()} "
          f"median of {args.repeats} interleaved steps")
    print(f"{'path':<18}{'fwd+bwd ms':>12}{'peak MiB':>10}")
    for name, (sec, mib, _) in rows.items():
        print(f"{name:<18}{sec * 1e3:>12.2f}{mib:>10.1f}")
    (_, _, before), (_, _, after) = rows.values()
    same = all(torch.equal(a, b) for a, b in zip(before, after))
    print(f"gradients identical: {same}")


if __name__ == "__main__":
    main()

"""Benchmark: one rank's expert slots, forward+backward per step, one slot at a time against all slots
from one `unbind` (`ExpertSlots.run_slots`). Prints a table (not a timed test).

Indexing a slot as `t[slot]` makes autograd zero-fill a gradient the size of the whole stacked tensor
for every slot used; one `unbind` per step gives each slot its own gradient slice.

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


def measure(step, store, xs, repeats: int) -> tuple[float, float, list[torch.Tensor]]:
    """Median seconds per step, peak traced MiB of one step (CPU), and the gradients."""
    times = []
    for _ in range(repeats):
        store.zero_grad()
        t0 = time.perf_counter()
        sum(y.sum() for y in step(store, xs)).backward()
        times.append(time.perf_counter() - t0)
    store.zero_grad()
    peak = _peak_bytes(lambda: sum(y.sum() for y in step(store, xs)).backward())
    return float(np.median(times)), peak / 2 ** 20, [t.grad.clone() for t in store.stacked]


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created by torch ops while active, and their peak (CPU or CUDA)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None and not func._schema.is_mutable:
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
    args = ap.parse_args()
    torch.manual_seed(0)
    store = SlotStore(args.d, args.f, np.arange(args.slots))
    for s, vec in enumerate(init_experts(args.slots, args.d, args.f, torch.Generator().manual_seed(0))):
        store.load_flat(s, vec)
    xs = [torch.randn(args.tokens, args.d) for _ in range(args.slots)]
    rows = [(name, *measure(fn, store, xs, args.repeats)) for name, fn in
            (("t[slot] per slot", one_at_a_time), ("one unbind", from_one_unbind))]
    print(f"slots={args.slots} d={args.d} f={args.f} tokens/slot={args.tokens} threads={torch.get_num_threads()}")
    print(f"{'path':<18}{'fwd+bwd ms':>12}{'peak MiB':>10}")
    for name, sec, mib, _ in rows:
        print(f"{name:<18}{sec * 1e3:>12.2f}{mib:>10.1f}")
    same = all(torch.equal(a, b) for a, b in zip(rows[0][3], rows[1][3]))
    print(f"gradients identical: {same}")


if __name__ == "__main__":
    main()

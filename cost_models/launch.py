"""Starting local worker processes for torch.distributed: shared by the profiler, the estimator's
validation and `flexmoe train`. torch is imported inside the functions, so this module stays
importable without it."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    """torchrun (and other elastic launchers) set these for every rank."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def init_distributed(rank: int, world: int, port: int | None, backend: str, timeout_s: float) -> None:
    """Join the process group: loopback with `port`, or the torchrun environment when port is None."""
    import torch.distributed as dist

    if port is not None:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def spawn_local(fn, args: tuple, nprocs: int, timeout_s: float, what: str) -> None:
    """`fn(rank, *args)` in `nprocs` fresh processes. Raises TimeoutError after `timeout_s`, and
    RuntimeError naming `what` when a worker fails; never leaves a worker behind."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    ctx = mp.start_processes(_run_then_exit, args=(fn,) + tuple(args), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish within {timeout_s:g} s; workers stopped")
    except ProcessException as exc:  # a worker raised or died
        raise RuntimeError(f"a {what} worker failed: {exc}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()


def _run_then_exit(rank: int, fn, *args) -> None:
    """Run one worker; after it succeeds, leave without the interpreter's teardown. Gloo's C++
    threads can still hold work objects whose destruction during finalization aborts the process
    (SIGABRT after a run that finished well), which would turn a good run into a failed one."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

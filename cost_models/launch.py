"""Starting local worker processes for torch.distributed: shared by the profiler, the estimator's
validation and `flexmoe train`. torch is imported inside the functions, so this module stays
importable without it."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

LOGGER = "flexmoe"  # every module logs under this name (`logging.getLogger("flexmoe.<part>")`)


def configure_logging(level: int) -> None:
    """One stderr handler on the `flexmoe` logger, in the CLI and in each worker it spawns."""
    log = logging.getLogger(LOGGER)
    log.setLevel(level)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("flexmoe: %(message)s"))
        log.addHandler(handler)


class WorkerError(RuntimeError):
    """A worker process failed; the message is one line: the first failure's cause."""


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
    """`fn(rank, *args)` in `nprocs` fresh processes. Raises TimeoutError after `timeout_s`; when a
    worker fails, the first failure's own error: an InputError as it was raised (bad input found
    in a worker), anything else as a one-line WorkerError naming `what` (its traceback is logged
    at debug level). Never leaves a worker behind."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    level = logging.getLogger(LOGGER).getEffectiveLevel()
    # torch says "Terminating process ... via signal SIGTERM" when we stop the survivors: our one line says enough.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="flexmoe-workers-") as errors:
        ctx = mp.start_processes(_run_then_exit, args=(fn, level, errors) + tuple(args), nprocs=nprocs,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} did not finish within {timeout_s:g} s; workers stopped")
        except ProcessException as exc:  # a worker raised or died
            _raise_first_failure(Path(errors), exc, what)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()


def _raise_first_failure(errors: Path, exc, what: str):
    """The earliest recorded failure is the cause; the others' are its echoes (a peer that went away)."""
    import json

    from cost_models.files import InputError

    records = []
    for f in errors.glob("*.json"):
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    if not records:  # killed before it could say why (a signal, out of memory)
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkerError(f"a {what} worker failed: {line}") from None
    first = min(records, key=lambda r: r["time"])
    logging.getLogger(LOGGER).debug("%s worker %d failed:\n%s", what, first["rank"], first["traceback"])
    if first["type"] == "InputError":
        raise InputError(first["problem"], first["path"]) from None
    raise WorkerError(f"{what} worker {first['rank']} failed: {first['type']}: {first['message']}") from None


def _run_then_exit(rank: int, fn, level: int, errors: str, *args) -> None:
    """Run one worker; record a failure for the parent (`_raise_first_failure`); after success, leave
    without the interpreter's teardown. Gloo's C++ threads can still hold work objects whose
    destruction during finalization aborts the process (SIGABRT after a run that finished well),
    which would turn a good run into a failed one."""
    import json

    configure_logging(level)
    try:
        fn(rank, *args)
    except BaseException as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        record = {"rank": rank, "time": time.time(), "type": type(exc).__name__, "message": message[:500],
                  "path": getattr(exc, "path", None), "problem": getattr(exc, "problem", None),
                  "traceback": traceback.format_exc()}
        tmp = Path(errors) / f".{rank}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(Path(errors) / f"{rank}.json")
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # release semaphores this process made (tqdm's lock): unreleased, the parent warns of leaks
        from multiprocessing import util
        util._run_finalizers(0)
    except Exception:
        pass
    os._exit(0)

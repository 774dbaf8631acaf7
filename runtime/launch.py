"""Start training: `world` gloo processes on this machine, or one rank of a torchrun job.

Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) the backend is NCCL when CUDA is present, else
gloo; otherwise we spawn local gloo processes on 127.0.0.1 with a free port. Children are always
torn down: a failed or hung rank must not leave the others waiting forever.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from cost_models.files import remove_stale_temps
from cost_models.launch import free_port, init_distributed, spawn_local
from runtime.trainer import TrainConfig, preflight, train


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, threads: int, pg_timeout: float) -> None:
    torch.set_num_threads(threads)
    init_distributed(rank, world, port, "gloo", pg_timeout)
    try:
        train(rank, world, cfg)
    finally:
        dist.destroy_process_group()


def spawn(cfg: TrainConfig, world: int, *, threads: int = 1, timeout: float = 3600.0,
          pg_timeout: float = 120.0) -> None:
    """Run `world` local ranks; raise if any fails or the whole run exceeds `timeout` seconds.

    Every input is checked here first (`preflight`), so bad input fails before a process starts;
    a rank killed while writing leaves no temporary file (this process removes it)."""
    preflight(cfg, world)
    if world == 1:
        torch.set_num_threads(threads)
        train(0, 1, cfg)
        return
    started = time.time()
    try:
        spawn_local(_worker, (world, free_port(), cfg, threads, pg_timeout), world, timeout, "training")
    finally:
        for out in (cfg.checkpoint, cfg.trace_out, cfg.result_out):
            if out:
                remove_stale_temps(out, started)


def run_torchrun(cfg: TrainConfig) -> None:
    """One rank of a torchrun job; NCCL on GPUs (one per local rank), gloo otherwise."""
    cuda = torch.cuda.is_available()
    device = None
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        train(dist.get_rank(), dist.get_world_size(), cfg, device=device)
    finally:
        dist.destroy_process_group()

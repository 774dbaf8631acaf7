"""`flexmoe train`: train the MoE GPT with live expert re-placement (local gloo ranks or torchrun)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from cost_models.files import InputError, finite_number, whole_number
from flexmoe import console
from flexmoe.commands.options import SolverName
from runtime.defaults import REPLAN_THRESHOLD

Opt = typer.Option


# Long only by its signature: one typed option per line is the CLI's help table; the body is ~15 lines.
def train_cmd(
    world_size: Annotated[int, Opt("--world-size", help="local gloo processes to spawn (ignored under torchrun)")] = 2,
    steps: Annotated[int, Opt(help="training steps")] = 200,
    batch: Annotated[int, Opt(help="sequences per rank per step")] = 8,
    seq_len: Annotated[int, Opt(help="tokens per sequence")] = 64,
    d_model: Annotated[int, Opt(help="model width")] = 64,
    layers: Annotated[int, Opt(help="transformer blocks (each with an MoE layer)")] = 2,
    heads: Annotated[int, Opt(help="attention heads")] = 4,
    d_ff: Annotated[int, Opt(help="expert hidden size")] = 256,
    experts: Annotated[int, Opt(help="experts per MoE layer")] = 8,
    top_k: Annotated[int, Opt(help="experts per token")] = 2,
    aux_coef: Annotated[float, Opt(help="load-balancing auxiliary loss coefficient (>= 0)")] = 0.01,
    router_skew: Annotated[float, Opt(help="fixed router bias towards low expert ids, in logits "
                                           "(benchmarking skew; 0: none)")] = 0.0,
    lr: Annotated[float, Opt(help="AdamW learning rate")] = 3e-3,
    seed: Annotated[int, Opt(help="seed for weights and data")] = 0,
    data: Annotated[Optional[Path], Opt(help="a text file (default: the Python standard library's sources)")] = None,
    slots: Annotated[int, Opt(help="expert slots per rank (0: one spare beyond an even split)")] = 0,
    policy: Annotated[Literal["static", "dynamic", "random"],
                      Opt(help="static: never re-place; dynamic: monitor, trigger, re-plan live; "
                               "random: random plans (tests)")] = "dynamic",
    dispatch: Annotated[Literal["adaptive", "plan"],
                        Opt(help="token shares per step: adaptive (re-solved from each step's counts by a "
                                 "min-max LP) or plan (the plan's own shares)")] = "adaptive",
    solver: Annotated[SolverName,
                      Opt(help="planner used by --policy dynamic")] = "greedy",
    interval: Annotated[int, Opt(help="steps between re-plans (also the amortisation window)")] = 50,
    threshold: Annotated[float, Opt(help="re-plan early when the balance (max/mean tokens per device) "
                                         "exceeds this")] = REPLAN_THRESHOLD,
    time_budget: Annotated[float, Opt(help="solver time budget per re-plan, seconds")] = 1.0,
    reproducible: Annotated[bool, Opt("--reproducible", help="apply each plan at the step after the one "
                                      "that triggered it, waiting for the planner: runs and resumed runs "
                                      "repeat exactly")] = False,
    plan: Annotated[Optional[Path], Opt(help="initial plan.json (default: static expert parallelism)")] = None,
    cluster: Annotated[Optional[Path], Opt(help="cluster.json for the planner (default: local-cpu preset)")] = None,
    trace_out: Annotated[Optional[Path], Opt(help="write the routing seen: counts[step, layer, rank, expert]")] = None,
    checkpoint: Annotated[Optional[Path], Opt(help="checkpoint file (weights, optimizer state, placement)")] = None,
    checkpoint_every: Annotated[int, Opt(help="steps between checkpoints (0: only at the end)")] = 0,
    resume: Annotated[Optional[Path], Opt(help="resume from this checkpoint")] = None,
    threads: Annotated[int, Opt(help="torch threads per rank")] = 1,
    timeout: Annotated[float, Opt(help="give up on the whole run after this many seconds")] = 86400.0,
    progress: Annotated[bool, Opt(help="progress bar on rank 0 (only on a terminal; otherwise ten log "
                                       "lines with loss, tokens/s and balance)")] = True,
    metrics_out: Annotated[Optional[Path], Opt(help="per-step metrics (loss, tokens/s, balance, re-plans, bytes "
                                                   "moved, time per phase): JSON lines, or CSV for a .csv name")] = None,
) -> None:
    """Train an MoE GPT; experts are re-placed live by the chosen policy. Balance is max/mean
    tokens per device (1.0 is perfect; the inverse of vLLM's and SGLang's 'balancedness')."""
    from runtime.model import ModelConfig
    from runtime.trainer import TrainConfig

    _check_inputs(world_size, threads, timeout, {"plan": plan, "cluster": cluster, "checkpoint": resume, "text": data})
    cfg = TrainConfig(
        ModelConfig(d_model, layers, heads, d_ff, experts, top_k, seq_len, aux_coef, router_skew),
        steps=steps, batch=batch, lr=lr, seed=seed, data=_str(data), slots=slots, policy=policy, dispatch=dispatch,
        solver=solver, interval=interval, threshold=threshold, time_budget=time_budget,
        plan=_str(plan), cluster=_str(cluster), trace_out=_str(trace_out), checkpoint=_str(checkpoint),
        checkpoint_every=checkpoint_every, resume=_str(resume), progress=console.progress(progress),
        reproducible=reproducible, summary=True, metrics_out=_str(metrics_out))
    if not _launch(cfg, world_size, threads, timeout):
        return
    written = [str(p) for p in (trace_out, checkpoint, metrics_out) if p]
    if written:
        console.log.info("wrote %s", ", ".join(written))


def _check_inputs(world_size: int, threads: int, timeout: float, files: dict[str, Path | None]) -> None:
    """The launcher's own numbers and the input files (`files`: what each is -> its path)."""
    whole_number(world_size, "--world-size", None, minimum=1, maximum=1024)
    whole_number(threads, "--threads", None, minimum=1, maximum=1024)
    finite_number(timeout, "--timeout", None, positive=True)
    for what, p in files.items():
        if p is not None and not p.is_file():
            raise InputError(f"a directory, not a {what} file" if p.is_dir() else f"no such {what} file", p)


def _launch(cfg, world_size: int, threads: int, timeout: float) -> bool:
    """Run the training: under torchrun as this rank, else as `world_size` local gloo processes.
    True on the process that reports (rank 0, or the launcher)."""
    from cost_models.launch import under_torchrun
    from runtime.launch import run_torchrun, spawn

    if not under_torchrun():
        spawn(cfg, world_size, threads=threads, timeout=timeout)  # checks every input first (preflight)
        return True
    from runtime.trainer import preflight
    preflight(cfg, int(os.environ["WORLD_SIZE"]))  # each rank, before joining the group
    run_torchrun(cfg)
    return int(os.environ["RANK"]) == 0


def _str(path: Path | None) -> str | None:
    return str(path) if path else None

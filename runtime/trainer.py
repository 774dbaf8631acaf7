"""The training loop of one rank: data, forward through the MoE model, owners' step, re-placement.

Per step the collectives are: per MoE layer one all-gather of counts and two all-to-alls (four
with backward); one all-reduce of dense gradients (which also carries the loss and the transfer
vote); one all-to-all of expert gradients and one of expert weights, all layers together; with a
live policy, one small broadcast for the plan.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from cost_models.cluster import Cluster, ExpertShape
from cost_models.files import InputError, check_outputs, finite_number, whole_number
from cost_models.presets import local_cpu
from planner.plan import Plan, static_layer
from planner.step_shares import DISPATCH_MODES
from planner.trace import Trace
from runtime import checkpoint as ckpt
from runtime import metrics
from runtime.data import Batches, load_corpus
from runtime.experts import init_experts
from runtime.layer import FlexMoERuntime
from runtime.model import ModelConfig, MoEGPT
from runtime.monitor import device_tokens, worst_balance
from runtime.replan import POLICIES, Faults


# Busy time of each step's parts on this rank (rank 0's go into the result).
PHASES = ("plan poll", "forward", "backward", "dense all-reduce", "expert exchange+step", "dense step+commit",
          "monitor")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 100
    batch: int = 8  # sequences per rank per step
    lr: float = 3e-3
    seed: int = 0
    data: str | None = None
    slots: int = 0  # expert slots per device; 0: enough for one copy of each expert plus one spare
    policy: str = "static"
    dispatch: str = "adaptive"  # shares per step: "adaptive" (re-solved from the step's counts) or "plan"
    solver: str = "greedy"
    interval: int = 50
    threshold: float = 1.1  # early re-plan above this balance: a plan change costs a few ms
    time_budget: float = 1.0
    plan: str | None = None
    cluster: str | None = None
    trace_out: str | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 0
    resume: str | None = None
    result_out: str | None = None  # rank 0 writes losses, timings and final weights here (tests, benchmarks)
    metrics_out: str | None = None  # rank 0 writes per-step metrics here (runtime.metrics): JSON lines or .csv
    progress: bool = True
    summary: bool = False  # rank 0 prints one summary line on stdout at the end (the CLI)
    reproducible: bool = False  # a plan started after step s applies at step s + 1 (waits for it): exact resume
    transfer_timeout: float = 30.0
    faults: Faults = field(default_factory=Faults)

    def check(self, world: int) -> "TrainConfig":
        """Every number finite and in range (NaN fails, unlike a bare `x <= 0`), before any work."""
        self.model.check()
        whole_number(self.steps, "--steps", None, maximum=10**9)
        whole_number(self.batch, "--batch", None, minimum=1, maximum=2**20)
        whole_number(self.seed, "--seed", None, maximum=2**32 - 1)
        whole_number(self.slots, "--slots", None, maximum=2**16)
        whole_number(self.interval, "--interval", None, minimum=1, maximum=10**9)
        whole_number(self.checkpoint_every, "--checkpoint-every", None, maximum=10**9)
        finite_number(self.lr, "--lr", None, positive=True, maximum=1e3)
        finite_number(self.time_budget, "--time-budget", None, positive=True, maximum=86400.0)
        finite_number(self.threshold, "--threshold", None, minimum=1.0, maximum=1e6)
        finite_number(self.transfer_timeout, "transfer timeout", None, positive=True)
        if self.policy not in POLICIES:
            raise InputError(f"unknown policy {self.policy!r} (known: {', '.join(POLICIES)})")
        if self.dispatch not in DISPATCH_MODES:
            raise InputError(f"unknown dispatch {self.dispatch!r} (known: {', '.join(DISPATCH_MODES)})")
        if self.slots and self.slots * world < self.model.num_experts:
            raise InputError(f"{self.slots} slots x {world} ranks cannot hold {self.model.num_experts} experts")
        if self.metrics_out is not None:
            metrics.check_path(self.metrics_out)
        return self

    def slots_per_device(self, world: int) -> int:
        return self.slots or math.ceil(self.model.num_experts / world) + 1


def initial_plan(cfg: TrainConfig, world: int) -> Plan:
    m = cfg.model
    slots = np.full(world, cfg.slots_per_device(world))
    if cfg.plan:
        plan = Plan.load(cfg.plan)
        if plan.num_devices != world or plan.num_experts != m.num_experts or len(plan.layers) != m.n_layers:
            raise InputError(f"plan is for {plan.num_devices} devices, {plan.num_experts} experts, "
                             f"{len(plan.layers)} layers; training has {world}, {m.num_experts}, {m.n_layers}",
                             cfg.plan)
        return plan
    return Plan(m.num_experts, slots, [static_layer(m.num_experts, slots, l) for l in range(m.n_layers)],
                {"solver": "static"})


def load_cluster(cfg: TrainConfig, world: int, slots: int) -> Cluster:
    """The planner's cluster: `--cluster` (one device per rank), or the local-cpu preset."""
    if not cfg.cluster:
        return local_cpu(slots, ExpertShape(cfg.model.d_model, cfg.model.d_ff, "fp32"), world)
    cluster = Cluster.load(cfg.cluster)
    if cluster.num_devices != world:
        raise InputError(f"cluster has {cluster.num_devices} devices, training has {world} ranks", cfg.cluster)
    return cluster


def preflight(cfg: TrainConfig, world: int) -> None:
    """Everything the workers will read or write, checked in the launching process before any
    worker starts: numbers, plan, cluster, checkpoint, text, and the output paths."""
    cfg.check(world)
    check_outputs({"--trace-out": cfg.trace_out, "--checkpoint": cfg.checkpoint, "--metrics-out": cfg.metrics_out,
                   "result": cfg.result_out},
                  inputs=[cfg.data, cfg.plan, cfg.cluster])  # --checkpoint may be --resume: replaced whole
    check_outputs({"--trace-out": cfg.trace_out, "--metrics-out": cfg.metrics_out, "result": cfg.result_out},
                  inputs=[cfg.resume])
    m = cfg.model
    plan = ckpt.load(cfg.resume, m.to_dict(), world)["plan"] if cfg.resume else initial_plan(cfg, world)
    load_cluster(cfg, world, int(plan.slots.max()))
    try:
        Batches(load_corpus(cfg.data), m.seq_len, cfg.batch, world, 0, cfg.seed)
    except InputError as exc:
        raise InputError(exc.problem, exc.path or cfg.data or "the standard library's sources") from None


def train(rank: int, world: int, cfg: TrainConfig, group=None, device=None) -> dict:
    """Run `cfg.steps` steps on this rank (the process group is already set up when world > 1)."""
    cfg.check(world)
    m = cfg.model
    logger = logging.getLogger("flexmoe.train")
    log = logger.info if rank == 0 else (lambda msg: None)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    model = MoEGPT(m).to(device)
    experts = init_experts(m.n_layers * m.num_experts, m.d_model, m.d_ff,
                           torch.Generator().manual_seed(cfg.seed + 1)).view(m.n_layers, m.num_experts, -1)
    dense_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    start, state = 0, None
    if cfg.resume:
        doc = ckpt.load(cfg.resume, m.to_dict(), world)
        plan = doc["plan"]
        model.load_state_dict(doc["dense"])
        dense_opt.load_state_dict(doc["dense_opt"])
        state, start = doc, doc["step"]  # experts' weights and moments, placement, step, re-plan state
        torch.set_rng_state(doc["rng"])
    else:
        plan = initial_plan(cfg, world)
    cluster = load_cluster(cfg, world, int(plan.slots.max()))
    # The experts: the public layer's runtime, as any model would use it (runtime.layer).
    fx = FlexMoERuntime(model, rank=rank, world=world, group=group, device=device, lr=cfg.lr, betas=(0.9, 0.99),
                        eps=1e-8, weight_decay=0.0, plan=plan, cluster=cluster, policy=cfg.policy,
                        dispatch=cfg.dispatch, solver=cfg.solver, interval=cfg.interval, threshold=cfg.threshold,
                        time_budget=cfg.time_budget, seed=cfg.seed, faults=cfg.faults,
                        transfer_timeout=cfg.transfer_timeout, weights=experts, state=state,
                        record=bool(cfg.trace_out), log=log, wait=cfg.reproducible)
    rt, monitor, replanner, share_rule = fx.rt, fx.monitor, fx.replanner, fx.share_rule
    data = Batches(load_corpus(cfg.data), m.seq_len, cfg.batch, world, rank, cfg.seed)
    params = list(model.parameters())
    losses, times, changes, balances, cpu, phases, served = [], [], [], [], [], [], []
    moved = []  # per step (sync, migration) bytes, all ranks together: for --metrics-out
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
    every = max(1, (cfg.steps - start) // 10)  # without a bar, ten log lines per run
    tokens_per_step = world * cfg.batch * m.seq_len
    try:
        for step in range(start, cfg.steps):
            t0, c0 = time.perf_counter(), time.thread_time()
            fx.begin_step()
            mark = [time.thread_time()]
            x, y = data.get(step)
            loss, _ = model(x.to(device), y.to(device))
            mark.append(time.thread_time())
            loss.backward()
            mark.append(time.thread_time())
            mean_loss = fx.sync(loss, params)  # dense gradients, loss and the transfer vote: one all-reduce
            mark.append(time.thread_time())
            sync = fx.expert_step() * metrics.FLOAT_BYTES
            mark.append(time.thread_time())
            dense_opt.step()
            dense_opt.zero_grad(set_to_none=True)
            migration = 0 if fx.pending is None else \
                metrics.migration_floats(rt.plan, fx.pending.plan, rt.params) * metrics.FLOAT_BYTES
            changed = fx.commit()
            mark.append(time.thread_time())
            counts = fx.observe()  # [L, G, E]
            dt = time.perf_counter() - t0
            cpu.append(time.thread_time() - c0)
            mark.append(time.thread_time())
            phases.append(np.diff([c0] + mark))
            losses.append(mean_loss)
            times.append(dt)
            changes.append(changed)
            moved.append((sync, migration))
            tokens = device_tokens(counts, [layer.last_share for layer in model.moe_layers])
            served.append(tokens.sum(axis=0))
            balances.append(worst_balance(tokens))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                                balance=f"{balances[-1]:.2f}")
            elif (step + 1 - start) % every == 0 or step + 1 == cfg.steps:
                log(f"step {step + 1}/{cfg.steps}: loss {mean_loss:.3f}, {tokens_per_step / dt:,.0f} tokens/s, "
                    f"balance {balances[-1]:.2f}")
            if cfg.checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                try:
                    _save(cfg, rank, fx, model, dense_opt, step + 1)
                except OSError as exc:  # a full disk: keep training, the previous checkpoint stays
                    logger.warning("step %d: checkpoint not written (%s); training goes on", step + 1, exc)
    finally:
        fx.close()
    if bar is not None:
        bar.close()
    if cfg.checkpoint:
        _save(cfg, rank, fx, model, dense_opt, max(cfg.steps, start))
    state = rt.full_state()
    cpu_all = torch.tensor(cpu, dtype=torch.float64, device=device)
    if world > 1:  # every rank's busy time per step: the straggler's is the step time on dedicated cores
        parts = [torch.empty_like(cpu_all) for _ in range(world)]
        dist.all_gather(parts, cpu_all, group=group)
        cpu_all = torch.stack(parts, dim=1)
    else:
        cpu_all = cpu_all[:, None]
    if rank == 0 and cfg.trace_out and monitor.history:
        Trace(np.stack(monitor.history), m.top_k, np.array(monitor.steps), np.arange(m.n_layers),
              "flexmoe train", {"world_size": world, "model": m.to_dict()}).save(cfg.trace_out)
    result = {"losses": losses, "step_times": times, "changes": changes, "balances": balances,
              "cpu_times": cpu_all.cpu().numpy(), "phases": np.array(phases), "phase_names": PHASES,
              "stats": replanner.stats if replanner else {}, "shares": share_rule.stats(), "start": start,
              "device_tokens": np.array(served),  # [steps, G] tokens each device computed, all layers
              "experts": state.cpu(), "dense": {k: v.cpu() for k, v in model.state_dict().items()},
              "plan": rt.plan.to_dict(), "tokens_per_step": tokens_per_step}
    table = metrics.rows(result, moved) if rank == 0 and cfg.metrics_out else None
    if table is not None:
        metrics.write(cfg.metrics_out, table)
        if not cfg.summary and not sys.stdout.isatty():  # a batch job's one line, without the CLI's own
            print(metrics.summary(table), flush=True)
    if rank == 0 and cfg.summary and losses:
        done = sum(times)
        print(f"trained steps {start + 1}..{start + len(losses)} on {world} ranks: loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}, {tokens_per_step * len(losses) / done:,.0f} tokens/s, balance "
              f"{np.mean(balances):.2f} mean, {result['stats'].get('committed', 0)} placement changes",
              flush=True)
    if rank == 0 and cfg.result_out:
        from cost_models.files import atomic_path
        with atomic_path(cfg.result_out) as tmp:
            torch.save(result, tmp)
    return result


def _save(cfg: TrainConfig, rank: int, fx: FlexMoERuntime, model, dense_opt, step: int) -> None:
    state, replan = fx.full_state(), fx.replan_state()  # collective: every rank takes part
    if rank == 0:
        ckpt.save(cfg.checkpoint, model_cfg=cfg.model.to_dict(), step=step, adam_t=fx.rt.t,
                  dense=model.state_dict(), dense_opt=dense_opt.state_dict(), experts=state, plan=fx.plan,
                  replan=replan)

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
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from cost_models.cluster import Cluster, ExpertShape
from cost_models.files import InputError, atomic_path, check_outputs, finite_number, whole_number
from cost_models.presets import local_cpu
from planner.plan import Plan, static_layer
from planner.solvers import check_solver
from planner.step_shares import DISPATCH_MODES
from planner.trace import Trace
from runtime import checkpoint as ckpt
from runtime import metrics
from runtime.data import Batches, load_corpus
from runtime.defaults import REPLAN_THRESHOLD
from runtime.experts import init_experts
from runtime.layer import FlexMoERuntime
from runtime.model import ModelConfig, MoEGPT
from runtime.monitor import device_tokens, worst_balance
from runtime.replan import POLICIES

if TYPE_CHECKING:
    from runtime.faults import Faults


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
    threshold: float = REPLAN_THRESHOLD  # early re-plan above this balance
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
    faults: Faults | None = None  # injected failures (tests): runtime.faults

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
        check_solver(self.solver)
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


@dataclass
class StepRecord:
    """What one step did, as rank 0's result and `--metrics-out` report it."""

    loss: float  # mean over ranks
    seconds: float  # wall time
    cpu: float  # this rank's busy time
    phases: np.ndarray  # busy time per PHASES entry
    changed: bool  # the placement switched at the end of the step
    balance: float  # worst layer's max over mean tokens per device
    served: np.ndarray  # [G] tokens each device computed, all layers
    sync_bytes: int  # expert gradients to owners and weights back, all ranks
    migration_bytes: int  # moving owners' moments, all ranks
    planner_failures: int  # background planning failures so far (rank 0 plans)


class Progress:
    """Rank 0's progress: a bar (cfg.progress), else ten log lines per run."""

    def __init__(self, cfg: TrainConfig, rank: int, start: int, tokens_per_step: int, log):
        self.steps, self.start, self.tokens, self.log = cfg.steps, start, tokens_per_step, log
        self.every = max(1, (cfg.steps - start) // 10)
        self.bar = None
        if rank == 0 and cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, rec: StepRecord) -> None:
        tok_s = self.tokens / rec.seconds
        if self.bar is not None:
            extra = {"plan_fail": rec.planner_failures} if rec.planner_failures else {}
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec.loss:.3f}", tok_s=f"{tok_s:,.0f}", balance=f"{rec.balance:.2f}",
                                 **extra)
        elif (step + 1 - self.start) % self.every == 0 or step + 1 == self.steps:
            failed = f", {rec.planner_failures} planner failures" if rec.planner_failures else ""
            self.log(f"step {step + 1}/{self.steps}: loss {rec.loss:.3f}, {tok_s:,.0f} tokens/s, "
                     f"balance {rec.balance:.2f}{failed}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """One rank's run: set-up (or resume) in the constructor, `step`, then `finish`; `run` does all.

    The experts go through the public runtime (`runtime.layer.FlexMoERuntime`), as any model's
    would; the trainer owns the GPT, its dense optimizer, the data, checkpoints and the outputs."""

    def __init__(self, rank: int, world: int, cfg: TrainConfig, group=None, device=None):
        cfg.check(world)
        m = cfg.model
        self.rank, self.world, self.cfg, self.group, self.device = rank, world, cfg, group, device
        self.logger = logging.getLogger("flexmoe.train")
        self.log = self.logger.info if rank == 0 else (lambda msg: None)
        torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
        self.model = MoEGPT(m).to(device)
        experts = init_experts(m.n_layers * m.num_experts, m.d_model, m.d_ff,
                               torch.Generator().manual_seed(cfg.seed + 1)).view(m.n_layers, m.num_experts, -1)
        self.dense_opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8,
                                           weight_decay=0.0)
        self.start, state, plan = self._resume()
        self.fx = FlexMoERuntime(self.model, rank=rank, world=world, group=group, device=device, lr=cfg.lr,
                                 betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, plan=plan,
                                 cluster=load_cluster(cfg, world, int(plan.slots.max())), policy=cfg.policy,
                                 dispatch=cfg.dispatch, solver=cfg.solver, interval=cfg.interval,
                                 threshold=cfg.threshold, time_budget=cfg.time_budget, seed=cfg.seed,
                                 faults=cfg.faults, transfer_timeout=cfg.transfer_timeout, weights=experts,
                                 state=state, record=bool(cfg.trace_out), log=self.log, wait=cfg.reproducible)
        self.data = Batches(load_corpus(cfg.data), m.seq_len, cfg.batch, world, rank, cfg.seed)
        self.params = list(self.model.parameters())
        self.tokens_per_step = world * cfg.batch * m.seq_len
        self.records: list[StepRecord] = []

    def _resume(self) -> tuple[int, dict | None, Plan]:
        """(first step, the experts' and re-plan state or None, placement): from `cfg.resume`,
        which also restores the dense weights, their optimizer and the RNG; else a fresh start."""
        cfg = self.cfg
        if not cfg.resume:
            return 0, None, initial_plan(cfg, self.world)
        doc = ckpt.load(cfg.resume, cfg.model.to_dict(), self.world)
        self.model.load_state_dict(doc["dense"])
        self.dense_opt.load_state_dict(doc["dense_opt"])
        torch.set_rng_state(doc["rng"])
        return doc["step"], doc, doc["plan"]  # experts' weights and moments, placement, step, re-plan state

    def run(self) -> dict:
        cfg = self.cfg
        progress = Progress(cfg, self.rank, self.start, self.tokens_per_step, self.log)
        try:
            for step in range(self.start, cfg.steps):
                rec = self.step(step)
                self.records.append(rec)
                progress.update(step, rec)
                if cfg.checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    try:
                        self.save(step + 1)
                    except OSError as exc:  # a full disk: keep training, the previous checkpoint stays
                        self.logger.warning("step %d: checkpoint not written (%s); training goes on", step + 1, exc)
        finally:
            self.fx.close()
        progress.close()
        return self.finish()

    def step(self, step: int) -> StepRecord:
        """One step on this rank; the phases are this thread's busy time in each of PHASES."""
        fx = self.fx
        t0, c0 = time.perf_counter(), time.thread_time()
        fx.begin_step()
        mark = [time.thread_time()]
        x, y = self.data.get(step)
        loss, _ = self.model(x.to(self.device), y.to(self.device))
        mark.append(time.thread_time())
        loss.backward()
        mark.append(time.thread_time())
        mean_loss = fx.sync(loss, self.params)  # dense gradients, loss and the transfer vote: one all-reduce
        mark.append(time.thread_time())
        sync = fx.expert_step() * metrics.FLOAT_BYTES
        mark.append(time.thread_time())
        self.dense_opt.step()
        self.dense_opt.zero_grad(set_to_none=True)
        migration = 0 if fx.pending is None else \
            metrics.migration_floats(fx.plan, fx.pending.plan, fx.rt.params) * metrics.FLOAT_BYTES
        changed = fx.commit()
        mark.append(time.thread_time())
        counts = fx.observe()  # [L, G, E]
        dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
        mark.append(time.thread_time())
        tokens = device_tokens(counts, [layer.last_share for layer in self.model.moe_layers])
        return StepRecord(mean_loss, dt, cpu, np.diff([c0] + mark), changed, worst_balance(tokens),
                          tokens.sum(axis=0), sync, migration, fx.stats().get("planner_failures", 0))

    def save(self, step: int) -> None:
        """Checkpoint at the end of `step` (collective: every rank takes part, rank 0 writes)."""
        fx, cfg = self.fx, self.cfg
        state, replan = fx.full_state(), fx.replan_state()
        if self.rank == 0:
            ckpt.save(cfg.checkpoint, model_cfg=cfg.model.to_dict(), step=step, adam_t=fx.rt.t,
                      dense=self.model.state_dict(), dense_opt=self.dense_opt.state_dict(), experts=state,
                      plan=fx.plan, replan=replan)

    def finish(self) -> dict:
        """The final checkpoint and the result (collective); rank 0 writes trace, metrics, result."""
        cfg = self.cfg
        if cfg.checkpoint:
            self.save(max(cfg.steps, self.start))
        result = self._result(self.fx.full_state(), self._cpu_times())
        if self.rank == 0:
            self._write_outputs(result)
        return result

    def _cpu_times(self) -> torch.Tensor:
        """[steps, world] every rank's busy time per step: the straggler's is the step time on
        dedicated cores (collective)."""
        cpu = torch.tensor([r.cpu for r in self.records], dtype=torch.float64, device=self.device)
        if self.world == 1:
            return cpu[:, None]
        parts = [torch.empty_like(cpu) for _ in range(self.world)]
        dist.all_gather(parts, cpu, group=self.group)
        return torch.stack(parts, dim=1)

    def _result(self, experts: torch.Tensor, cpu: torch.Tensor) -> dict:
        recs, fx = self.records, self.fx
        return {"losses": [r.loss for r in recs], "step_times": [r.seconds for r in recs],
                "changes": [r.changed for r in recs], "balances": [r.balance for r in recs],
                "cpu_times": cpu.cpu().numpy(), "phases": np.array([r.phases for r in recs]),
                "phase_names": PHASES, "stats": fx.stats(), "shares": fx.share_rule.stats(),
                "start": self.start, "planner_failures": [r.planner_failures for r in recs],
                "device_tokens": np.array([r.served for r in recs]),  # [steps, G] tokens each device computed
                "experts": experts.cpu(), "dense": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "plan": fx.plan.to_dict(), "tokens_per_step": self.tokens_per_step}

    def _write_outputs(self, result: dict) -> None:
        """Rank 0: the trace, the metrics (and a batch job's one line), the summary, the result file."""
        cfg, m, monitor = self.cfg, self.cfg.model, self.fx.monitor
        if cfg.trace_out and monitor.history:
            Trace(np.stack(monitor.history), m.top_k, np.array(monitor.steps), np.arange(m.n_layers),
                  "flexmoe train", {"world_size": self.world, "model": m.to_dict()}).save(cfg.trace_out)
        if cfg.metrics_out:
            table = metrics.rows(result, [(r.sync_bytes, r.migration_bytes) for r in self.records])
            metrics.write(cfg.metrics_out, table)
            if not cfg.summary and not sys.stdout.isatty():  # a batch job's one line, without the CLI's own
                print(metrics.summary(table), flush=True)
        if cfg.summary and self.records:
            print(self._summary(result), flush=True)
        if cfg.result_out:
            with atomic_path(cfg.result_out) as tmp:
                torch.save(result, tmp)

    def _summary(self, result: dict) -> str:
        losses, times = result["losses"], result["step_times"]
        failed = result["planner_failures"][-1]
        return (f"trained steps {self.start + 1}..{self.start + len(losses)} on {self.world} ranks: loss "
                f"{losses[0]:.3f} -> {losses[-1]:.3f}, {self.tokens_per_step * len(losses) / sum(times):,.0f} "
                f"tokens/s, balance {np.mean(result['balances']):.2f} mean, "
                f"{result['stats'].get('committed', 0)} placement changes"
                + (f", {failed} planner failures" if failed else ""))


def train(rank: int, world: int, cfg: TrainConfig, group=None, device=None) -> dict:
    """Run `cfg.steps` steps on this rank (the process group is already set up when world > 1)."""
    return Trainer(rank, world, cfg, group, device).run()

"""Live re-placement: trigger, background planning, the commit protocol, migration.

Protocol (deterministic on every rank):
1. After each step rank 0 feeds the monitor's smoothed counts to the trigger (interval or
   imbalance threshold); a trigger starts planning in a background thread, off the critical path.
2. At the start of every step all ranks join one small broadcast from rank 0: empty, or a
   finished plan with its sequence number. Every rank validates it the same way; a plan that
   fails validation is dropped everywhere and the current placement stays.
3. An accepted plan commits at the end of that step (the broadcast names it). Its transfers start
   at once and overlap the step's forward and backward: moving owners' moments go point-to-point
   (isend/irecv, one message per tensor, no packing).
4. After backward every rank waits for its transfers (with a timeout); failures are counted in
   the dense all-reduce that happens anyway, so all ranks agree. On any failure the plan is
   dropped and training goes on under the current placement.
5. Otherwise the step's weight exchange also serves the new replicas (they receive the updated
   weights) and sends moving owners' summed gradients to their new homes, which replay them onto
   the prefetched moments; at the step boundary every rank switches to the new plan (in place:
   only slots whose expert changes are written).

New replicas need only weights, and weights change every step, so a copy fetched earlier would be
stale: they ride the step's bucketed weight exchange instead (DESIGN.md, "Owners"). Moments are
the large part (twice the weights) and are what the asynchronous prefetch moves.

Planner failures (an exception in the background planner) are counted (`stats["planner_failures"]`,
reported per step by `flexmoe train --metrics-out` and on the progress line), each logged in one
line that says whether the planner refused its input (`InputError`) or failed (any other
exception: a bug), and after `failure_limit` failures in a row a one-line warning. Training then
goes on under the current placement and later triggers try again: the placement changes speed,
never the result, so a run that can still train is not stopped for it (a transient failure, such
as a solver out of memory on one skewed batch, recovers at the next trigger).

The broadcast's format is `runtime.wire`; injected faults for tests are `runtime.faults`, which
overrides the seams marked below (`_solve`, `_announce`, `_send`, `_wait`, `after_vote`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from cost_models.files import InputError
from planner.plan import LayerPlan, Plan
from planner.solve import make_plan
from planner.solvers import check_solver
from runtime.defaults import PLANNER_FAILURE_LIMIT, REPLAN_THRESHOLD
from runtime.monitor import balance
from runtime.wire import decode, encode

POLICIES = ("static", "dynamic", "random")


@dataclass
class Pending:
    plan: Plan
    seq: int
    commit_step: int  # the step at whose end every rank switches (the announcing step: transfers overlap it)
    works: list = field(default_factory=list)
    inbox: dict = field(default_factory=dict)  # (layer, expert) -> (m, v) being received
    prefetched: dict = field(default_factory=dict)
    staged: dict = field(default_factory=dict)
    replay: dict = field(default_factory=dict)
    waiter: threading.Thread | None = None
    error: BaseException | None = None


def _wait_all(pending: Pending) -> None:
    try:
        for w in pending.works:
            w.wait()
    except BaseException as exc:  # reported to the step thread, which votes
        pending.error = exc


def random_plan(num_experts: int, slots: np.ndarray, layers: int, rng: np.random.Generator) -> Plan:
    """A random valid plan: random replica sets, random uneven shares, random owners."""
    slots = np.asarray(slots)
    G, S = len(slots), int(slots.max())
    out = []
    for l in range(layers):
        while True:
            x = np.zeros((num_experts, G), dtype=bool)
            free = slots.copy()
            for e in rng.permutation(num_experts):  # every expert once
                g = rng.choice(np.flatnonzero(free > 0))
                x[e, g] = True
                free[g] -= 1
            for g in range(G):  # fill some spare slots with extra replicas
                cand = np.flatnonzero(~x[:, g])
                k = min(free[g], len(cand), int(rng.integers(0, free[g] + 1)))
                x[rng.choice(cand, size=k, replace=False), g] = True
            if x.any(axis=1).all():
                break
        share = np.where(x, rng.uniform(0.2, 1.0, x.shape), 0.0)
        share /= share.sum(axis=1, keepdims=True)
        owner = np.array([rng.choice(np.flatnonzero(x[e])) for e in range(num_experts)])
        out.append(LayerPlan.from_matrices(x, share, owner, S, l, {"solver": "random"}))
    return Plan(num_experts, slots, out, {"solver": "random"})


def _same(a: Plan, b: Plan) -> bool:
    return all(np.array_equal(x.assign, y.assign) and np.allclose(x.share, y.share, rtol=0, atol=1e-12)
               and np.array_equal(x.owner, y.owner) for x, y in zip(a.layers, b.layers))


class Replanner:
    """Trigger and background planner on rank 0; the per-step plan broadcast on every rank.

    `failure_limit`: background planning failures in a row before a warning (see the module
    notes: the run goes on under the current placement either way)."""

    def __init__(self, policy: str, *, rank: int, world: int, num_experts: int, slots: np.ndarray, layers: int,
                 cluster=None, solver: str = "greedy", time_budget: float = 1.0, interval: int = 50,
                 threshold: float = REPLAN_THRESHOLD, seed: int = 0, transfer_timeout: float = 30.0, group=None,
                 log=None, device=None, wait: bool = False, share_rule=None,
                 failure_limit: int = PLANNER_FAILURE_LIMIT):
        if policy not in POLICIES:
            raise InputError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
        check_solver(solver)
        self.policy, self.rank, self.world = policy, rank, world
        self.E, self.slots, self.L = num_experts, np.asarray(slots), layers
        self.cluster, self.solver, self.budget = cluster, solver, time_budget
        self.interval, self.threshold, self.seed = max(1, interval), threshold, seed
        self.timeout, self.group, self.device = transfer_timeout, group, device
        self.log = log or (lambda msg: None)
        self.share_rule = share_rule  # the trigger judges balance under the shares the dispatch would use
        self.wait = wait  # reproducible: a plan started after step s always applies at step s + 1
        self.failure_limit, self.failures_in_row = max(1, failure_limit), 0
        self.seq = 0
        self.thread: threading.Thread | None = None
        self.result: Plan | None = None
        self.error: Exception | None = None
        self.last_trigger = 0
        self.stats = {"plans": 0, "committed": 0, "rejected": 0, "failed": 0, "unchanged": 0, "switch_s": 0.0,
                      "solve_s": 0.0, "planner_failures": 0}

    # --- rank 0: trigger and background planning --------------------------------------------
    def after_step(self, step: int, smoothed: np.ndarray, plan: Plan) -> None:
        if self.rank != 0 or self.policy == "static" or self.thread is not None or self.result is not None:
            return
        since = step + 1 - self.last_trigger
        due = since >= self.interval
        if self.policy == "dynamic" and not due and since >= max(1, self.interval // 4):
            due = balance(smoothed, plan, self.share_rule) > self.threshold
        if not due:
            return
        self.last_trigger = step + 1
        loads, current = smoothed.copy(), plan
        self.thread = threading.Thread(target=self._plan, args=(loads, current, self.seq + 1), daemon=True)
        self.thread.start()

    def _plan(self, loads: np.ndarray, current: Plan, seq: int) -> None:
        t0 = time.perf_counter()
        try:
            self.result = self._solve(loads, current, seq)
        except Exception as exc:  # counted and reported by the step thread (_harvest)
            self.error = exc
        self.stats["solve_s"] += time.perf_counter() - t0

    def _solve(self, loads: np.ndarray, current: Plan, seq: int) -> Plan:
        """The policy's plan for the smoothed `loads[L, S, E]` (seam: runtime.faults)."""
        if self.policy == "random":
            return random_plan(self.E, self.slots, self.L, np.random.default_rng([self.seed, seq]))
        return make_plan(self.cluster, loads, current, solver=self.solver, time_budget=self.budget,
                         workers=1, seed=self.seed, interval=self.interval, reproducible=self.wait)

    def _harvest(self) -> None:
        """Account for a finished planning attempt: a success clears the run of failures, a
        failure is counted, logged, and warned about once `failure_limit` happen in a row."""
        exc, self.error = self.error, None
        if exc is None:
            self.failures_in_row = 0 if self.result is not None else self.failures_in_row
            return
        self.stats["planner_failures"] += 1
        self.failures_in_row += 1
        what = (f"the planner refused its input: {exc}" if isinstance(exc, InputError)
                else f"planner error {type(exc).__name__}: {exc}")
        self.log(f"re-planning failed ({what}); placement unchanged")
        if self.failures_in_row == self.failure_limit:
            logging.getLogger("flexmoe.replan").warning(
                "re-planning failed %d times in a row (last: %s); training goes on under the current "
                "placement", self.failures_in_row, what)

    def close(self) -> None:
        """Let a running solver finish: native solver threads alive at exit abort the process."""
        if self.thread is not None:
            self.thread.join(self.budget * self.L + 30.0)
            self.thread = None
            self._harvest()

    # --- checkpointing: what a resumed run needs to trigger and apply plans as the uninterrupted one
    def state(self) -> dict:
        """The trigger's and the planner's state at a step boundary (a running plan is waited for:
        its result is part of the state)."""
        self.close()
        return {"last_trigger": self.last_trigger, "seq": self.seq,
                "pending": self.result.to_dict() if self.result is not None else None}

    def restore(self, state: dict) -> None:
        self.last_trigger, self.seq = int(state["last_trigger"]), int(state["seq"])
        if self.rank == 0:
            self.result, self.thread = state.get("pending"), None  # the next poll() hands it out

    # --- every rank: the per-step broadcast and validation ----------------------------------
    def poll(self, step: int, current: Plan | None = None) -> Pending | None:
        plan = None
        if self.rank == 0:
            if self.thread is not None and self.wait:
                self.thread.join()
            if self.thread is not None and not self.thread.is_alive():
                self.thread = None
                self._harvest()
            if self.thread is None:  # a finished plan (or one restored from a checkpoint)
                plan, self.result = self.result, None
        buf = self._announce(plan, step)
        if self.world > 1:
            if self.device is not None:  # NCCL only moves device tensors
                buf = buf.to(self.device)
            dist.broadcast(buf, 0, group=self.group)
            buf = buf.cpu()
        original = plan
        plan, seq, commit_step = decode(buf, self.slots, self.L, self.E)
        if plan is None:
            return None
        if original is not None:  # only numbers travel; rank 0 keeps how the plan was made
            plan.info = dict(original.info)
            for a, b in zip(plan.layers, original.layers):
                a.info = dict(b.info)
        self.seq = seq
        self.stats["plans"] += 1
        try:
            plan.validate()
        except InputError as exc:
            self.stats["rejected"] += 1
            self.log(f"step {step}: plan {seq} rejected, placement unchanged: {exc}")
            return None
        if current is not None and _same(plan, current):
            self.stats["unchanged"] += 1  # nothing to move: no switch
            return None
        return Pending(plan, seq, commit_step)

    def _announce(self, plan: Plan | None, step: int) -> torch.Tensor:
        """Rank 0's broadcast buffer for `plan` (or none) committing at `step` (seam: runtime.faults)."""
        return encode(plan, self.seq + 1, step, self.L, len(self.slots), int(self.slots.max()), self.E)

    # --- transfers: moving owners' moments, point to point, overlapped with the step ---------
    def start_transfers(self, pending: Pending, rt) -> None:
        me, P = self.rank, rt.params
        old = rt.plan.layers
        moves = [(l, e, int(old[l].owner[e]), int(lp.owner[e])) for l, lp in enumerate(pending.plan.layers)
                 for e in range(self.E) if lp.owner[e] != old[l].owner[e]]
        base = pending.seq * 8192
        for peer in range(self.world):
            if peer == me:
                continue
            # One message per moment tensor, sent and received in place: no packing copies. The
            # sender's tensors are not touched until the wait below, before the owners' step.
            out = [(l, e) for l, e, s, d in moves if s == me and d == peer]
            for i, key in enumerate(out):
                for j, t in enumerate(rt.moments[key]):
                    self._send(pending, t, peer, (base + 2 * i + j) % (2**31 - 1))
            inc = [(l, e) for l, e, s, d in moves if s == peer and d == me]
            for i, key in enumerate(inc):
                m, v = torch.empty(P, device=rt.device), torch.empty(P, device=rt.device)
                pending.inbox[key] = (m, v)
                for j, t in enumerate((m, v)):
                    tag = (base + 2 * i + j) % (2**31 - 1)
                    pending.works.append(dist.irecv(t, peer, group=self.group, tag=tag))
        if pending.works:
            # Wait in a helper thread: gloo only marks p2p work complete inside wait(), and its own
            # wait(timeout) tears the connection down, so the step thread joins this one instead.
            pending.waiter = threading.Thread(target=_wait_all, args=(pending,), daemon=True)
            pending.waiter.start()

    def _send(self, pending: Pending, t: torch.Tensor, peer: int, tag: int) -> None:
        """Post one moment tensor's send (seam: runtime.faults)."""
        pending.works.append(dist.isend(t, peer, group=self.group, tag=tag))

    def finish_transfers(self, pending: Pending, params: int) -> bool:
        """Wait for this rank's transfers; False if any failed or timed out (the caller votes)."""
        try:
            self._wait(pending)
        except Exception as exc:  # gloo raises RuntimeError on timeout; treat every failure alike
            self.log(f"plan {pending.seq}: transfer failed ({exc}); placement unchanged")
            return False
        pending.prefetched = dict(pending.inbox)
        return True

    def _wait(self, pending: Pending) -> None:
        """Raise if this rank's transfers failed or are not done within the timeout (seam: runtime.faults)."""
        waiter = pending.waiter
        if waiter is not None:
            waiter.join(self.timeout)
            if waiter.is_alive():
                raise TimeoutError(f"transfer not done after {self.timeout:g} s")
            if pending.error is not None:
                raise pending.error

    def after_vote(self, pending: Pending) -> None:
        """Called on every rank once all ranks have voted on `pending`'s transfers (seam:
        runtime.faults posts the sends it held back here)."""

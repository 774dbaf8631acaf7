"""Injected failures for tests, kept out of the production re-plan path: `FaultyReplanner`
overrides `Replanner`'s seams (`_solve`, `_announce`, `_send`, `_wait`, `after_vote`).
`FlexMoERuntime` uses it only when `faults` names some failure."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist

from planner.plan import Plan
from runtime.replan import Pending, Replanner


@dataclass
class Faults:
    """Failures to inject: plans by sequence number (1 is the first plan broadcast), planning
    attempts by count on rank 0 (1 is the first trigger)."""

    corrupt_plans: set = field(default_factory=set)  # the broadcast plan fails validation
    fail_transfers: set = field(default_factory=set)  # the last rank's transfer wait raises
    delay_transfers: set = field(default_factory=set)  # senders post too late: receivers time out
    fail_plans: set = field(default_factory=set)  # the background planner raises

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


class FaultyReplanner(Replanner):
    def __init__(self, *args, faults: Faults, **kw):
        super().__init__(*args, **kw)
        self.faults, self.attempts = faults, 0
        self.late: list = []  # (tensor, peer, tag) sends held back by an injected delay

    def _solve(self, loads: np.ndarray, current: Plan, seq: int) -> Plan:
        self.attempts += 1
        if self.attempts in self.faults.fail_plans:
            raise RuntimeError(f"injected planner failure (attempt {self.attempts})")
        return super()._solve(loads, current, seq)

    def _announce(self, plan: Plan | None, step: int) -> torch.Tensor:
        buf = super()._announce(plan, step)
        if buf[0] and int(buf[1]) in self.faults.corrupt_plans:
            buf[-1] = len(self.slots) + 7  # an owner outside the cluster: validation must catch it
        return buf

    def _send(self, pending: Pending, t: torch.Tensor, peer: int, tag: int) -> None:
        if pending.seq in self.faults.delay_transfers:
            self.late.append((t, peer, tag))
        else:
            super()._send(pending, t, peer, tag)

    def _wait(self, pending: Pending) -> None:
        if pending.seq in self.faults.fail_transfers and self.rank == self.world - 1:
            raise RuntimeError("injected transfer failure")
        super()._wait(pending)

    def after_vote(self, pending: Pending) -> None:
        """Post the held-back sends, so the peer's abandoned receive completes."""
        for buf, peer, tag in self.late:
            dist.isend(buf, peer, group=self.group, tag=tag).wait()
        self.late.clear()

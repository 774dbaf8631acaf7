"""FlexMoE inside any PyTorch model: a layer for the experts, and the runtime that places them.

Your model keeps its router; FlexMoE takes the router's output and does the rest::

    from runtime.layer import FlexMoE, FlexMoERuntime

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(d, E, bias=False)
            self.experts = FlexMoE(E, d, lambda: MyExpert(d, f))   # any nn.Module, a factory, or a list
        def forward(self, h):                                       # h [..., d]
            gate, idx = self.router(h).softmax(-1).topk(2, dim=-1)  # your routing, any top-k
            return self.experts(h, idx, gate / gate.sum(-1, keepdim=True))

    model = Model()                                  # the same seed on every rank
    fx = FlexMoERuntime(model, lr=1e-3, policy="dynamic")   # after init_process_group (gloo or NCCL)
    dense_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # experts are not module parameters
    for step in range(steps):
        fx.begin_step()
        loss = model(batch).mean()                   # this rank's data
        loss.backward()
        fx.finish_step(loss, dense=model.parameters())  # all-reduces dense grads (data-parallel mean)
        dense_opt.step(); dense_opt.zero_grad()

`FlexMoE` is the layer: the tokens' top-k expert ids and gates in, the gated sum of the experts'
outputs out (dropless). Experts are not parameters of the layer: each rank holds replicas in
slots (`runtime.experts.ExpertSlots`, one stacked tensor per parameter of the expert module, run
with `torch.func.functional_call`), and dispatch is `runtime.dispatch.moe_apply` (counts
all-gathered, per-step shares, node-first routing, uneven all-to-all with autograd).

`FlexMoERuntime` owns what spans layers and steps: the placement (`planner.plan.Plan`), the
owners' AdamW state (`runtime.owners.ExpertRuntime`: replicas' gradients to owners, weights back,
one exchange per step for all layers), the per-step share rule, the monitor, and with a live
policy the background planner and the commit protocol (`runtime.replan.Replanner`).
`state_dict()` (collective) holds every expert's weights and moments per expert plus the
placement, so a checkpoint does not depend on where replicas sat. `flexmoe train`'s GPT is one
user of these two classes (`runtime.model`, `runtime.trainer`).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cost_models.cluster import ExpertShape
from cost_models.presets import local_cpu
from planner.plan import Plan, static_layer
from planner.step_shares import ShareRule
from runtime.defaults import PLANNER_FAILURE_LIMIT, REPLAN_THRESHOLD
from runtime.dispatch import moe_apply
from runtime.experts import flat_params
from runtime.monitor import Monitor, device_tokens, worst_balance
from runtime.owners import AdamW, ExpertRuntime
from runtime.replan import Replanner

if TYPE_CHECKING:
    from runtime.faults import Faults


def _experts(expert, num_experts: int) -> tuple[nn.Module, torch.Tensor]:
    """(template module, initial weights [E, params]) from a module, a factory or a list of modules."""
    if isinstance(expert, (list, tuple, nn.ModuleList)):
        mods = list(expert)
        if len(mods) != num_experts:
            raise ValueError(f"{len(mods)} expert modules for {num_experts} experts")
    elif isinstance(expert, nn.Module):  # copies, each re-initialised where the module knows how
        mods = []
        for _ in range(num_experts):
            m = copy.deepcopy(expert)
            for sub in m.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
            mods.append(m)
    elif callable(expert):
        mods = [expert() for _ in range(num_experts)]
    else:
        raise TypeError("expert must be an nn.Module, a factory of them, or a list of num_experts modules")
    flats = [flat_params(m) for m in mods]
    if any(f.numel() != flats[0].numel() for f in flats):
        raise ValueError("all experts must have the same parameter shapes")
    template = copy.deepcopy(mods[0])
    template.requires_grad_(False)
    return template, torch.stack(flats).float()


class FlexMoE(nn.Module):
    """The experts of one MoE layer, placed by FlexMoE.

    `FlexMoE(num_experts, d_model, expert)`: `expert` is one `nn.Module` (copied and
    re-initialised per expert), a factory called once per expert, or a list of `num_experts`
    modules whose weights become the experts' initial weights. Every expert maps `[n, d_model]`
    to `[n, d_model]` and has float32 parameters.

    `forward(h, idx, gate)`: tokens `h[..., d_model]`, their expert ids `idx[..., k]` (int) and
    gates `gate[..., k]`; returns `sum_j gate[..., j] * expert_{idx[..., j]}(h)`, shaped like `h`.
    Works once a `FlexMoERuntime` has attached the model.
    """

    def __init__(self, num_experts: int, d_model: int, expert: nn.Module | Callable[[], nn.Module] | list):
        super().__init__()
        if num_experts < 1 or d_model < 1:
            raise ValueError("num_experts and d_model must be >= 1")
        self.num_experts, self.d_model = num_experts, d_model
        template, initial = _experts(expert, num_experts)
        self._template = (template,)  # a tuple: not a submodule, so no parameters or state_dict entries
        self.initial = initial  # [E, params]: the weights FlexMoERuntime starts from
        self.store = None
        self.x = self.share = None  # replicas [E, G] in place and the plan's shares
        self.share_rule = None  # per-step shares (planner.step_shares.ShareRule); None: the plan's
        self.rank, self.world, self.group = 0, 1, None
        self.nodes: np.ndarray | None = None  # node of each rank, for node-first dispatch (None: one node)
        self.last_counts: np.ndarray | None = None  # [sources, experts] of the last forward
        self.last_share: np.ndarray | None = None  # [experts, devices] shares it dispatched with

    @property
    def template(self) -> nn.Module:
        return self._template[0]

    @property
    def params(self) -> int:
        return self.initial.shape[1]

    def bind(self, store, x: np.ndarray, share: np.ndarray, rank: int, world: int, group=None,
             nodes: np.ndarray | None = None, share_rule=None) -> None:
        """Attach this rank's slots and the layer's placement (FlexMoERuntime does this)."""
        self.store, self.x, self.share, self.rank, self.world, self.group = store, x, share, rank, world, group
        self.nodes, self.share_rule = nodes, share_rule

    def forward(self, h: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.store is None:
            raise RuntimeError("FlexMoE layer is not attached: build FlexMoERuntime(model) first")
        d = h.shape[-1]
        k = idx.shape[-1]
        if d != self.d_model or gate.shape != idx.shape or idx.shape[:-1] != h.shape[:-1]:
            raise ValueError(f"expected h[..., {self.d_model}] and idx, gate [..., k] over the same tokens; got "
                             f"{tuple(h.shape)}, {tuple(idx.shape)}, {tuple(gate.shape)}")
        out, counts, self.last_share = moe_apply(h.reshape(-1, d), idx.reshape(-1, k).long(), gate.reshape(-1, k),
                                                 self.store, self.x, self.share, self.rank, self.world, self.group,
                                                 self.nodes, self.share_rule)
        self.last_counts = counts
        return out.view(h.shape)


def expert_shape(layer: FlexMoE) -> ExpertShape:
    """The cost model's view of an expert: width d_model, and the FFN width with as many parameters."""
    d = layer.d_model
    return ExpertShape(d, max(1, round((layer.params - d) / (2 * d + 1))), "fp32")


def _moe_layers(model: nn.Module | Iterable[FlexMoE]) -> list[FlexMoE]:
    """The model's FlexMoE layers in module order; they must agree on experts and their size."""
    mods = model.modules() if isinstance(model, nn.Module) else model
    layers = [m for m in mods if isinstance(m, FlexMoE)]
    if not layers:
        raise ValueError("the model has no FlexMoE layer")
    if any(l.num_experts != layers[0].num_experts or l.params != layers[0].params for l in layers):
        raise ValueError("every FlexMoE layer needs the same number of experts and expert parameters")
    return layers


def _starting_plan(plan: Plan | None, slots: int, E: int, world: int, L: int) -> Plan:
    """`plan` checked against the model, or static expert parallelism with `slots` per rank (0:
    one spare beyond an even split)."""
    if plan is None:
        per = slots or math.ceil(E / world) + 1
        if per * world < E:
            raise ValueError(f"{per} slots x {world} ranks cannot hold {E} experts")
        counts = np.full(world, per)
        plan = Plan(E, counts, [static_layer(E, counts, l) for l in range(L)], {"solver": "static"})
    if plan.num_devices != world or plan.num_experts != E or len(plan.layers) != L:
        raise ValueError(f"plan is for {plan.num_devices} devices, {plan.num_experts} experts, "
                         f"{len(plan.layers)} layers; the model has {world}, {E}, {L}")
    return plan


def _replanner(policy: str, faults: Faults | None, **kw) -> Replanner:
    """The live policy's replanner; with faults to inject, the test double that injects them."""
    if faults:
        from runtime.faults import FaultyReplanner  # test code: loaded only when faults are asked for
        return FaultyReplanner(policy, faults=faults, **kw)
    return Replanner(policy, **kw)


class FlexMoERuntime:
    """Places the experts of every `FlexMoE` layer of `model` (in module order) across the ranks.

    Call after `torch.distributed.init_process_group` (or without it: one rank). Options: `lr`,
    `betas`, `eps`, `weight_decay` (the experts' AdamW, kept by each expert's owner); `slots` per
    rank (0: one spare beyond an even split) or an initial `plan`; `cluster` (default: the
    local-cpu preset) for the planner and the per-step shares; `policy` static | dynamic |
    random; `dispatch` adaptive | plan; `solver`, `interval`, `threshold`, `time_budget` as in
    `flexmoe train`; `failure_limit` background planning failures in a row before a warning
    (`runtime.replan`); `state` from `state_dict()` to resume; `weights[L, E, params]` to override
    the layers' initial weights; `faults` (`runtime.faults`) injects failures, for tests.
    """

    def __init__(self, model: nn.Module | Iterable[FlexMoE], *, rank: int | None = None, world: int | None = None,
                 group=None, device=None, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, slots: int = 0, plan: Plan | None = None,
                 cluster=None, policy: str = "static", dispatch: str = "adaptive", solver: str = "greedy",
                 interval: int = 50, threshold: float = REPLAN_THRESHOLD, time_budget: float = 1.0, seed: int = 0,
                 faults: Faults | None = None, transfer_timeout: float = 30.0, weights: torch.Tensor | None = None,
                 state: dict | None = None, record: bool = False, log=None, wait: bool = False,
                 failure_limit: int = PLANNER_FAILURE_LIMIT):
        self.layers = _moe_layers(model)
        E = self.layers[0].num_experts
        if rank is None or world is None:
            dist_on = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank(group) if dist_on else 0
            world = dist.get_world_size(group) if dist_on else 1
        self.rank, self.world, self.group, self.device = rank, world, group, device
        self.log = log or (lambda msg: None)
        L = len(self.layers)
        moments, self.step = None, 0
        if state is not None:
            plan = state["plan"] if isinstance(state["plan"], Plan) else Plan.from_dict(state["plan"])
            weights, moments, self.step = state["experts"][0], state["experts"][1:], int(state.get("step", 0))
        plan = _starting_plan(plan, slots, E, world, L)
        if weights is None:
            weights = torch.stack([l.initial for l in self.layers])
        opt = AdamW(lr, betas[0], betas[1], eps, weight_decay)
        self.rt = ExpertRuntime(plan, [l.template for l in self.layers], rank, world, weights.to(device), opt,
                                group, device)
        if moments is not None:
            self.rt.t = int(state["adam_t"])
            for (l, e), (m, v) in self.rt.moments.items():
                m.copy_(moments[0, l, e])
                v.copy_(moments[1, l, e])
        self.cluster = cluster or local_cpu(int(plan.slots.max()), expert_shape(self.layers[0]), world)
        if self.cluster.num_devices != world:
            raise ValueError(f"cluster has {self.cluster.num_devices} devices, training has {world} ranks")
        self.nodes = self.cluster.node_of if self.cluster.num_nodes > 1 else None  # the estimator's routing rule
        self.share_rule = ShareRule(self.cluster, dispatch, warn=self.log)
        self.monitor = Monitor(record=record and rank == 0)
        self.replanner = None
        if policy != "static":
            self.replanner = _replanner(policy, faults, rank=rank, world=world, num_experts=E, slots=plan.slots,
                                        layers=L, cluster=self.cluster, solver=solver, time_budget=time_budget,
                                        interval=interval, threshold=threshold, seed=seed,
                                        transfer_timeout=transfer_timeout, group=group, log=self.log,
                                        device=device, share_rule=ShareRule(self.cluster, dispatch), wait=wait,
                                        failure_limit=failure_limit)
        self.pending = None
        if state is not None and state.get("replan") is not None:
            self._restore_replan(state["replan"])
        self.bind()

    @property
    def plan(self) -> Plan:
        return self.rt.plan

    def bind(self) -> None:
        for l, layer in enumerate(self.layers):
            rule = functools.partial(self.share_rule, owner=self.rt.plan.layers[l].owner)  # sync counts too
            layer.bind(self.rt.stores[l], self.rt.replicas(l), self.rt.share(l), self.rank, self.world, self.group,
                       self.nodes, rule)

    # --- the step, in the order every rank runs it -----------------------------------------
    def begin_step(self) -> None:
        """Before forward: join the plan broadcast; an accepted plan's transfers start now."""
        self.pending = self.replanner.poll(self.step, self.rt.plan) if self.replanner else None
        if self.pending is not None:
            c0 = time.thread_time()
            self.replanner.start_transfers(self.pending, self.rt)
            self.replanner.stats["switch_s"] += time.thread_time() - c0

    def sync(self, loss: torch.Tensor | None = None, dense: Iterable[torch.Tensor] | None = None) -> float:
        """After backward: wait for transfers, then one all-reduce carrying the dense gradients
        (replaced by their mean over ranks; None: leave them, e.g. under DDP), the loss and the
        transfer vote. Returns the loss averaged over ranks (nan without a loss)."""
        pending = self.pending
        ok = True
        if pending is not None:
            c0 = time.thread_time()
            ok = self.replanner.finish_transfers(pending, self.rt.params)
            self.replanner.stats["switch_s"] += time.thread_time() - c0
        params = list(dense) if dense is not None else []
        ref = loss if loss is not None else (params[0] if params else None)
        dev = ref.device if ref is not None else (self.device or "cpu")
        value = loss.detach().reshape(1).float() if loss is not None else torch.zeros(1, device=dev)
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                          for p in params] + [value.to(dev), torch.tensor([0.0 if ok else 1.0], device=dev)])
        if self.world > 1:
            dist.all_reduce(flat, group=self.group)
        o = 0
        for p in params:
            n = p.numel()
            p.grad = flat[o:o + n].view_as(p) / self.world
            o += n
        mean_loss, failures = float(flat[o]) / self.world, float(flat[o + 1])
        if pending is not None:
            self.replanner.after_vote(pending)
            if failures:
                self.replanner.stats["failed"] += 1
                self.pending = None
        return mean_loss if loss is not None else math.nan

    def expert_step(self) -> int:
        """Experts' gradients to owners, owners' AdamW step, weights back (and to a pending plan's
        new replicas). Returns the floats all ranks sent."""
        return self.rt.step(self.pending)["moved_floats"]

    def commit(self) -> bool:
        """Clear expert gradients; at the end of the step that announced a plan, switch to it."""
        self.rt.zero_grad()
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        assert pending.commit_step == self.step, "a plan commits at the end of the step that announced it"
        c0 = time.thread_time()
        self.rt.commit(pending)
        self.bind()
        self.replanner.stats["switch_s"] += time.thread_time() - c0
        self.replanner.stats["committed"] += 1
        return True

    def observe(self) -> np.ndarray:
        """Feed the step's counts `[L, sources, experts]` to the monitor and the trigger; next step."""
        counts = np.stack([layer.last_counts for layer in self.layers])
        self.monitor.update(self.step, counts)
        if self.replanner:
            self.replanner.after_step(self.step, self.monitor.smoothed, self.rt.plan)
        self.step += 1
        return counts

    def finish_step(self, loss: torch.Tensor | None = None, dense: Iterable[torch.Tensor] | None = None) -> dict:
        """`sync`, `expert_step`, `commit`, `observe` in one call: after backward, before the dense
        optimizer's step. Returns the mean loss, whether the placement changed, and the balance."""
        mean_loss = self.sync(loss, dense)
        self.expert_step()
        changed = self.commit()
        counts = self.observe()
        return {"loss": mean_loss, "replaced": changed, "balance": self.balance(counts)}

    def balance(self, counts: np.ndarray) -> float:
        """Max over mean tokens per device, worst layer, under the shares the last forward used."""
        return worst_balance(device_tokens(counts, [layer.last_share for layer in self.layers]))

    # --- state ------------------------------------------------------------------------------
    def full_state(self) -> torch.Tensor:
        """[3, L, E, params]: every expert's weights and AdamW moments (collective)."""
        return self.rt.full_state()

    def replan_state(self) -> dict:
        """The monitor's smoothed counts and the trigger's and planner's state (a running plan is
        waited for): with them a resumed run re-plans on the same steps as an uninterrupted one."""
        state = self.replanner.state() if self.replanner else {"last_trigger": 0, "seq": 0, "pending": None}
        state["smoothed"] = None if self.monitor.smoothed is None else torch.from_numpy(self.monitor.smoothed.copy())
        return state

    def _restore_replan(self, state: dict) -> None:
        sm = state.get("smoothed")
        self.monitor.smoothed = None if sm is None else np.asarray(torch.as_tensor(sm).double())
        if self.replanner:
            pending = state.get("pending")
            if isinstance(pending, dict):
                pending = Plan.from_dict(pending)
            self.replanner.restore({**state, "pending": pending})

    def state_dict(self) -> dict:
        """Collective: every rank must call it. Pass it back as `FlexMoERuntime(..., state=...)`."""
        return {"experts": self.full_state().cpu(), "plan": self.rt.plan.to_dict(), "adam_t": self.rt.t,
                "step": self.step, "replan": self.replan_state()}

    def stats(self) -> dict:
        return dict(self.replanner.stats) if self.replanner else {}

    def close(self) -> None:
        """Let a background solver finish (call at the end; native solver threads alive at exit abort)."""
        if self.replanner:
            self.replanner.close()

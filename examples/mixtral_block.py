"""A Mixtral-style sparse MoE block (router, top-2, SwiGLU experts), placed by FlexMoE.

Written here from the architecture's description (nothing downloaded). Two lines make the block
FlexMoE-placed (marked `# FlexMoE`): the experts become a `FlexMoE` layer, and forward hands it
the router's top-k ids and gates. The training loop adds `FlexMoERuntime(model)` and two calls
per step. Without FlexMoE the same block is the single-process reference.

Run on 2 CPU processes (gloo; NCCL with one GPU per rank when CUDA is present):

    PYTHONPATH=$PWD torchrun --nproc-per-node 2 examples/mixtral_block.py

Each rank trains on its half of a batch; rank 0 then trains the plain block on the whole batch in
one process and prints how far apart the two are (outputs, gradients, weights after the steps).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from runtime.layer import FlexMoE, FlexMoERuntime


class SwiGLUExpert(nn.Module):
    """Mixtral's expert: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, d: int, f: int, num_experts: int = 8, top_k: int = 2, flexmoe: bool = False):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(d, num_experts, bias=False)  # the router
        experts = [SwiGLUExpert(d, f) for _ in range(num_experts)]
        self.experts = FlexMoE(num_experts, d, experts) if flexmoe else nn.ModuleList(experts)  # FlexMoE

    def forward(self, x):
        """x [batch, seq, d] -> (output [batch, seq, d], router logits [tokens, experts])."""
        b, t, d = x.shape
        h = x.reshape(-1, d)
        logits = self.gate(h)
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        weights, idx = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
        if isinstance(self.experts, FlexMoE):
            return self.experts(h, idx, weights).view(b, t, d), logits  # FlexMoE
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, j = torch.where(idx == e)
            if len(tok):
                out.index_add_(0, tok, expert(h[tok]) * weights[tok, j, None])
        return out.view(b, t, d), logits


# --- the demonstration: distributed FlexMoE against the single-process block -------------------
SETUP = dict(d=16, f=32, num_experts=4, top_k=2, batch=4, seq=8, steps=3, lr=1e-2, seed=0)


def batch(world: int, setup: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (every rank makes the same one and takes its share)."""
    g = torch.Generator().manual_seed(setup["seed"] * 1000 + step)
    x = torch.randn(world * setup["batch"], setup["seq"], setup["d"], generator=g)
    return x, torch.randn(x.shape, generator=g)


def build(setup: dict, flexmoe: bool) -> MixtralSparseMoeBlock:
    torch.manual_seed(setup["seed"])  # the same block on every rank and in the reference
    return MixtralSparseMoeBlock(setup["d"], setup["f"], setup["num_experts"], setup["top_k"], flexmoe)


def run_flexmoe(rank: int, world: int, setup: dict = SETUP, device=None, **placement) -> dict:
    """Train the FlexMoE-placed block on this rank's half of each batch; returns the first step's
    outputs (all ranks, in batch order), gradients (dense mean, experts' mean), the losses and
    the final weights (every rank gets them). `placement`: FlexMoERuntime options."""
    model = build(setup, flexmoe=True).to(device)
    fx = FlexMoERuntime(model, device=device, lr=setup["lr"], **placement)  # FlexMoE
    dense_opt = torch.optim.AdamW(model.parameters(), lr=setup["lr"], betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    B, res = setup["batch"], {"losses": [], "replaced": 0}
    try:
        for step in range(setup["steps"]):
            x, y = batch(world, setup, step)
            x, y = x[rank * B:(rank + 1) * B].to(device), y[rank * B:(rank + 1) * B].to(device)
            fx.begin_step()  # FlexMoE
            out, _ = model(x)
            loss = F.mse_loss(out, y)
            loss.backward()
            if step == 0:
                res["out"] = _gather(out.detach(), world)
                res["expert_grad"] = _expert_grads(fx, world)
            info = fx.finish_step(loss, dense=model.parameters())  # FlexMoE
            if step == 0:
                res["dense_grad"] = {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters()}
            dense_opt.step()
            dense_opt.zero_grad(set_to_none=True)
            res["losses"].append(info["loss"])
            res["replaced"] += info["replaced"]
        res["experts"] = fx.full_state()[0, 0].cpu()  # [E, params], one layer
        res["dense"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        res["stats"] = fx.stats()
    finally:
        fx.close()
    return res


def _gather(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t.cpu()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()


def _expert_grads(fx: FlexMoERuntime, world: int) -> torch.Tensor:
    """[E, params]: each expert's gradient summed over its replicas and ranks, over `world` (the
    data-parallel mean the owners step with)."""
    store = fx.rt.stores[0]
    g = torch.zeros(fx.layers[0].num_experts, store.params, device=store.stacked[0].device)
    for slot, e in enumerate(store.experts):
        if e >= 0:
            g[e] += store.grad_flat(slot)
    if world > 1:
        dist.all_reduce(g)
    return (g / world).cpu()


def run_reference(world: int, setup: dict = SETUP) -> dict:
    """The plain block in one process on the whole batch, with torch.optim.AdamW."""
    model = build(setup, flexmoe=False)
    opt = torch.optim.AdamW(model.parameters(), lr=setup["lr"], betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    res = {"losses": []}
    for step in range(setup["steps"]):
        x, y = batch(world, setup, step)
        out, _ = model(x)
        loss = F.mse_loss(out, y)
        loss.backward()
        if step == 0:
            res["out"] = out.detach().clone()
            res["expert_grad"] = torch.stack([torch.nn.utils.parameters_to_vector([p.grad for p in e.parameters()])
                                              for e in model.experts])
            res["dense_grad"] = {"gate.weight": model.gate.weight.grad.clone()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        res["losses"].append(loss.item())
    res["experts"] = torch.stack([torch.nn.utils.parameters_to_vector(e.parameters()).detach() for e in model.experts])
    res["dense"] = {"gate.weight": model.gate.weight.detach().clone()}
    return res


def differences(a: dict, b: dict) -> dict:
    """Largest absolute differences between a FlexMoE run and the reference."""
    return {"out": float((a["out"] - b["out"]).abs().max()),
            "dense_grad": float((a["dense_grad"]["gate.weight"] - b["dense_grad"]["gate.weight"]).abs().max()),
            "expert_grad": float((a["expert_grad"] - b["expert_grad"]).abs().max()),
            "loss": max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
            "experts": float((a["experts"] - b["experts"]).abs().max()),
            "dense": float((a["dense"]["gate.weight"] - b["dense"]["gate.weight"]).abs().max())}


TOLERANCE = 1e-5  # absolute; float32 sums in another order (the test states its own)


def spawned(rank: int, world: int, port: int, out: str, placement: dict, pg_timeout: float = 60.0) -> None:
    """Entry for local gloo processes (tests): rank 0 saves its result to `out`."""
    from cost_models.launch import init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, port, "gloo", pg_timeout)
    try:
        res = run_flexmoe(rank, world, **placement)
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="random", help="static | dynamic | random (re-places every --interval)")
    ap.add_argument("--interval", type=int, default=1)
    ap.add_argument("--steps", type=int, default=SETUP["steps"])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = None
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    setup = dict(SETUP, steps=args.steps)
    try:
        res = run_flexmoe(rank, world, setup, device, policy=args.policy, interval=args.interval)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        ref = run_reference(world, setup)
        diff = differences(res, ref)
        print(f"FlexMoE on {world} ranks ({'nccl' if cuda else 'gloo'}), policy {args.policy}: "
              f"{res['replaced']} re-placements committed in {setup['steps']} steps")
        print("losses  " + " ".join(f"{v:.6f}" for v in res["losses"]))
        print("ref     " + " ".join(f"{v:.6f}" for v in ref["losses"]))
        print("max |FlexMoE - single process|: " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))
        ok = all(v <= TOLERANCE for v in diff.values())
        print("match within %.0e: %s" % (TOLERANCE, "yes" if ok else "NO"))
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()

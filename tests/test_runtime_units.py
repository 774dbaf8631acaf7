"""Runtime pieces in one process: routing, dispatch, the owners' optimizer, plan broadcast format."""

import numpy as np
import pytest
import torch

from cost_models.files import InputError
from runtime.dispatch import moe_apply
from runtime.experts import SlotStore, init_experts
from runtime.model import ModelConfig
from runtime.owners import AdamW
from runtime.replan import random_plan
from runtime.wire import decode, encode
from runtime.trainer import TrainConfig, train


def test_moe_apply_single_process_matches_direct_computation():
    torch.manual_seed(0)
    d, f, E, k, N = 8, 16, 4, 2, 20
    w = init_experts(E, d, f, torch.Generator().manual_seed(1))
    store = SlotStore(d, f, np.arange(E))
    for e in range(E):
        store.load_flat(e, w[e] + 0.01 * torch.randn(w.shape[1]))
    h = torch.randn(N, d)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    gate = torch.rand(N, k)
    out, counts, _ = moe_apply(h, idx, gate, store, np.ones((E, 1), bool), np.ones((E, 1)), 0, 1)
    ref = torch.stack([sum(gate[t, j] * store.run(int(idx[t, j]), h[t:t + 1])[0] for j in range(k)) for t in range(N)])
    assert torch.allclose(out, ref, atol=1e-5)
    assert counts.sum() == N * k
    out.sum().backward()
    assert store.w1.grad is not None and store.w1.grad.abs().sum() > 0


def test_expert_slots_run_each_slot_with_its_own_weights_and_gradients():
    """The reference is the plain formula on slot j's own tensors, not `ExpertSlots.run`, so a
    slot mix-up in `run_slots` (or in `run`, which goes through it) cannot cancel out."""
    torch.manual_seed(0)
    d, f, E = 6, 10, 3
    store = SlotStore(d, f, np.arange(E))
    w = init_experts(E, d, f, torch.Generator().manual_seed(2))
    for e in range(E):
        store.load_flat(e, w[e] + 0.1 * e)
    xs = [torch.randn(n, d) for n in (4, 1, 3)]
    outs = store.run_slots([(j, xs[j]) for j in (2, 0, 1)])
    sum(o.square().sum() for o in outs).backward()
    ref = [torch.nn.functional.gelu(xs[j] @ store.w1[j] + store.b1[j]) @ store.w2[j] + store.b2[j] for j in range(E)]
    for o, j in zip(outs, (2, 0, 1)):
        assert torch.allclose(o, ref[j], atol=1e-6)
    grads = torch.autograd.grad(sum(r.square().sum() for r in ref), store.stacked)
    for mine, expected in zip(store.stacked, grads):
        assert torch.allclose(mine.grad, expected, atol=1e-5)


def test_flat_adamw_matches_torch():
    torch.manual_seed(0)
    p = torch.randn(50)
    ref = torch.nn.Parameter(p.clone())
    topt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt, m, v, q = AdamW(1e-2, 0.9, 0.99, 1e-8, 0.1), torch.zeros(50), torch.zeros(50), p.clone()
    for t in range(1, 6):
        g = torch.randn(50)
        ref.grad = g.clone()
        topt.step()
        opt.step(q, m, v, g, t)
    assert torch.allclose(q, ref.detach(), atol=1e-6)


def test_plan_broadcast_format_round_trips_and_corruption_is_caught():
    slots = np.array([3, 3])
    plan = random_plan(4, slots, 2, np.random.default_rng(3))
    buf = encode(plan, 7, 11, 2, 2, 3, 4)
    back, seq, commit = decode(buf, slots, 2, 4)
    assert (seq, commit) == (7, 11)
    for a, b in zip(plan.layers, back.layers):
        assert (a.assign == b.assign).all() and np.allclose(a.share, b.share) and (a.owner == b.owner).all()
    buf[-1] = 9
    bad, _, _ = decode(buf, slots, 2, 4)
    with pytest.raises(InputError):
        bad.validate()
    assert decode(encode(None, 0, 0, 2, 2, 3, 4), slots, 2, 4)[0] is None


def test_single_rank_training_runs_and_learns(tmp_path):
    cfg = TrainConfig(ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=32, num_experts=4, top_k=1, seq_len=16),
                      steps=12, batch=4, lr=1e-2, progress=False)
    r = train(0, 1, cfg)
    assert len(r["losses"]) == 12 and np.isfinite(r["losses"]).all()
    assert np.mean(r["losses"][-3:]) < r["losses"][0]


def test_bad_config_is_input_error():
    with pytest.raises(InputError):
        TrainConfig(ModelConfig(d_model=30, n_heads=4)).check(2)
    with pytest.raises(InputError):
        TrainConfig(policy="bogus").check(2)
    with pytest.raises(InputError):
        TrainConfig(ModelConfig(num_experts=8), slots=2).check(2)

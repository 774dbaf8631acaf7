"""The public layer (`runtime.layer`) on the Mixtral-style example: 2 gloo ranks with live random
re-placement match the plain block trained in one process; one-process checks of the API."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cost_models.launch import free_port, spawn_local  # noqa: E402
from examples import mixtral_block as mb  # noqa: E402
from runtime.layer import FlexMoE, FlexMoERuntime  # noqa: E402

# Stated tolerances (absolute): float32 sums taken in another order. Measured: outputs and expert
# gradients bit-equal, router gradient 2e-9, weights after 3 AdamW steps 1e-7.
OUT_TOL, GRAD_TOL, WEIGHT_TOL = 1e-6, 1e-7, 1e-6


def _check(res, ref):
    torch.testing.assert_close(res["out"], ref["out"], rtol=0, atol=OUT_TOL)
    torch.testing.assert_close(res["dense_grad"]["gate.weight"], ref["dense_grad"]["gate.weight"], rtol=0, atol=GRAD_TOL)
    torch.testing.assert_close(res["expert_grad"], ref["expert_grad"], rtol=0, atol=GRAD_TOL)
    assert max(abs(a - b) for a, b in zip(res["losses"], ref["losses"])) < WEIGHT_TOL
    torch.testing.assert_close(res["experts"], ref["experts"], rtol=0, atol=WEIGHT_TOL)
    torch.testing.assert_close(res["dense"]["gate.weight"], ref["dense"]["gate.weight"], rtol=0, atol=WEIGHT_TOL)
    assert ref["losses"][-1] != ref["losses"][0]  # the steps really changed the weights


def test_two_gloo_ranks_with_live_replacement_match_the_single_process_block(tmp_path):
    out = tmp_path / "rank0.pt"
    # Random plans every step: replicas with uneven shares, owners moving; per-step LP shares.
    setup = dict(mb.SETUP, steps=5)  # steps run after switches, not only before them
    placement = {"policy": "random", "interval": 1, "dispatch": "adaptive", "setup": setup}
    spawn_local(mb.spawned, (2, free_port(), str(out), placement, 60.0), 2, 120, "layer test")
    res = torch.load(out, weights_only=False)
    assert res["replaced"] >= 2 and res["stats"]["committed"] == res["replaced"], res["stats"]
    _check(res, mb.run_reference(2, setup))


def test_one_process_matches_and_resumes_from_its_state():
    _check(mb.run_flexmoe(0, 1), mb.run_reference(1))
    # state_dict -> a fresh runtime continues exactly
    setup = dict(mb.SETUP, steps=2)
    model = mb.build(setup, flexmoe=True)
    fx = FlexMoERuntime(model, lr=setup["lr"])
    for step in range(2):
        x, y = mb.batch(1, setup, step)
        fx.begin_step()
        F.mse_loss(model(x)[0], y).backward()
        fx.finish_step()
        model.zero_grad()
    state = fx.state_dict()
    model2 = mb.build(setup, flexmoe=True)  # dense weights were not stepped: equal to model's
    again = FlexMoERuntime(model2, lr=setup["lr"], state=state)
    assert again.step == 2 and again.rt.t == 2
    x, y = mb.batch(1, setup, 2)
    for m, r in ((model, fx), (model2, again)):  # one more step each: the same experts and moments
        r.begin_step()
        F.mse_loss(m(x)[0], y).backward()
        r.finish_step()
    torch.testing.assert_close(again.full_state(), fx.full_state(), rtol=0, atol=0)


def test_expert_forms_and_misuse():
    torch.manual_seed(0)
    factory = FlexMoE(3, 4, lambda: nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 4)))
    copied = FlexMoE(3, 4, nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 4)))
    assert factory.initial.shape == copied.initial.shape == (3, 4 * 5 + 5 + 5 * 4 + 4)
    assert not torch.equal(copied.initial[0], copied.initial[1])  # copies are re-initialised
    assert list(copied.parameters()) == [] and copied.state_dict() == {}  # experts live in slots
    h = torch.randn(6, 4)
    idx, gate = torch.randint(0, 3, (6, 2)), torch.rand(6, 2)
    with pytest.raises(RuntimeError, match="not attached"):
        factory(h, idx, gate)
    FlexMoERuntime(nn.ModuleList([factory]))
    ref = sum(gate[:, j, None] * torch.stack([torch.func.functional_call(
        factory.template, _unflat(factory, int(idx[t, j])), (h[t],)) for t in range(6)]) for j in range(2))
    torch.testing.assert_close(factory(h, idx, gate), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        factory(h, idx, gate[:, :1])
    with pytest.raises(ValueError):
        FlexMoE(3, 4, [nn.Linear(4, 4)] * 2)
    with pytest.raises(ValueError):
        FlexMoERuntime(nn.Linear(2, 2))


def _unflat(layer, e):
    vec, out, o = layer.initial[e], {}, 0
    for name, p in layer.template.named_parameters():
        out[name] = vec[o:o + p.numel()].view_as(p)
        o += p.numel()
    return out

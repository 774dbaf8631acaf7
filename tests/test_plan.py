import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.files import InputError
from tests.file_helpers import assert_rejected
from cost_models.presets import preset
from planner.eplb_mapping import from_eplb, load_eplb, save_eplb, to_eplb
from planner.moves import diff, summarize
from planner.plan import EMPTY, LayerPlan, Plan, static_layer


def random_layer(rng, experts, devices, slots, equal_shares=False):
    """A random valid placement: every expert once, then extra replicas in free slots."""
    assign = np.full((devices, slots), EMPTY)
    cells = rng.permutation(devices * slots)
    for e, cell in enumerate(cells[:experts]):
        assign[cell // slots, cell % slots] = e
    for cell in cells[experts:]:
        g, s = divmod(cell, slots)
        candidates = [e for e in range(experts) if e not in assign[g]]
        if candidates and rng.random() < 0.7:
            assign[g, s] = rng.choice(candidates)
    share = np.zeros(assign.shape)
    owner = np.zeros(experts, dtype=int)
    for e in range(experts):
        where = np.argwhere(assign == e)
        w = np.ones(len(where)) if equal_shares else rng.random(len(where)) + 0.1
        share[tuple(where.T)] = w / w.sum()
        owner[e] = where[0][0] if equal_shares else where[rng.integers(len(where))][0]
    return LayerPlan(assign, share, owner)


def random_plan(seed, experts=6, devices=4, slots=3, layers=2, equal_shares=False):
    rng = np.random.default_rng(seed)
    return Plan(experts, np.full(devices, slots),
                [random_layer(rng, experts, devices, slots, equal_shares) for _ in range(layers)],
                {"solver": "random"}).validate()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 8), st.integers(1, 4), st.integers(1, 3))
def test_json_round_trip_is_lossless(tmp_path_factory, seed, experts, devices, slots):
    if devices * slots < experts:
        return
    plan = random_plan(seed, experts, devices, slots)
    path = tmp_path_factory.mktemp("p") / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    for a, b in zip(plan.layers, back.layers):
        assert np.array_equal(a.assign, b.assign) and np.array_equal(a.share, b.share)
        assert np.array_equal(a.owner, b.owner)
    assert back.info == plan.info


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.booleans())
def test_eplb_round_trip_is_lossless(seed, equal):
    plan = random_plan(seed, equal_shares=equal)
    arrays = to_eplb(plan)
    back = from_eplb(**arrays, num_devices=plan.num_devices, num_experts=plan.num_experts)
    for a, b in zip(plan.layers, back.layers):
        assert np.array_equal(a.assign, b.assign) and np.allclose(a.share, b.share) and np.array_equal(a.owner, b.owner)
    if equal:  # EPLB's own tensors alone carry everything an equal-share, first-owner plan has
        plain = from_eplb(arrays["phy2log"], plan.num_devices, plan.num_experts, arrays["log2phy"], arrays["logcnt"])
        for a, b in zip(plan.layers, plain.layers):
            assert np.array_equal(a.assign, b.assign) and np.allclose(a.share, b.share)
            assert np.array_equal(a.owner, b.owner)


def test_eplb_file_round_trip_and_duplicates(tmp_path):
    plan = random_plan(5)
    save_eplb(plan, tmp_path / "m.npz")
    back = load_eplb(tmp_path / "m.npz", plan.num_devices)
    assert all(np.array_equal(a.assign, b.assign) for a, b in zip(plan.layers, back.layers))
    # EPLB may pack two replicas of one expert on one GPU: they merge, shares add up.
    merged = from_eplb(np.array([[0, 0, 1, 2]]), num_devices=2)
    assert merged.layers[0].assign.tolist() == [[0, EMPTY], [1, 2]]
    assert merged.layers[0].share.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    with pytest.raises(InputError, match="logcnt disagrees"):
        from_eplb(np.array([[0, 1, 1, 2]]), 2, logcnt=np.array([[1, 1, 2]]))
    with pytest.raises(InputError, match="expert 1 has no physical replica"):
        from_eplb(np.array([[0, 0, 2, 2]]), 2, num_experts=3)
    with pytest.raises(InputError, match="do not divide"):
        from_eplb(np.array([[0, 1, 2]]), 2)
    for bad in (-2, 3):  # -1 is EPLB's empty slot; anything else outside 0..2 is refused by name
        with pytest.raises(InputError, match=r"outside -1\.\.2"):
            from_eplb(np.array([[0, 1, bad, 2]]), 2, num_experts=3)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), experts=st.integers(1, 12), devices=st.integers(1, 6))
def test_from_matrices_fills_each_device_in_expert_order(seed, experts, devices):
    rng = np.random.default_rng(seed)
    x = rng.random((experts, devices)) < 0.5
    share = np.where(x, rng.random((experts, devices)), 0.0)
    max_slots = max(int(x.sum(axis=0).max()), 1) + 1
    lp = LayerPlan.from_matrices(x, share, np.zeros(experts, dtype=np.int64), max_slots)
    for g in range(devices):  # the plain reading of the rule
        held = np.flatnonzero(x[:, g])
        assert lp.assign[g].tolist() == held.tolist() + [EMPTY] * (max_slots - len(held))
        assert lp.share[g].tolist() == share[held, g].tolist() + [0.0] * (max_slots - len(held))
    if x.sum(axis=0).max() > 0:
        with pytest.raises(InputError, match="would hold"):
            LayerPlan.from_matrices(x, share, np.zeros(experts, dtype=np.int64), int(x.sum(axis=0).max()) - 1)


def test_validation_names_the_first_device_at_fault():
    lp = static_layer(4, np.array([3, 3]))
    lp.assign[1] = [1, 1, EMPTY]  # device 1: twice expert 1
    lp.assign[0] = [0, 2, 3]  # device 0: one slot more than it has
    with pytest.raises(InputError, match="device 0 uses more than its 2 slots"):
        lp.validate(np.array([2, 3]))
    with pytest.raises(InputError, match="device 1 holds two replicas"):
        lp.validate(np.array([3, 3]))


def test_validation_catches_each_defect():
    slots = np.array([2, 2])
    good = LayerPlan([[0, 1], [2, EMPTY]], [[1.0, 0.5], [1.0, 0.0]], [0, 0, 1])
    with pytest.raises(InputError, match="shares of expert 1 sum to 0.5"):
        good.validate(slots)
    ok = LayerPlan([[0, 1], [2, 1]], [[1.0, 0.5], [1.0, 0.5]], [0, 0, 1])
    ok.validate(slots)
    cases = [
        (LayerPlan([[0, 1], [2, 3]], [[1, 1], [1, 1]], [0, 0, 1]), "outside 0..2"),
        (LayerPlan([[0, 0], [2, 1]], [[.5, .5], [1, 1]], [0, 1, 1]), "two replicas of one expert"),
        (LayerPlan([[0, 1], [1, EMPTY]], [[1, .5], [.5, 0]], [0, 0, 1]), "experts [2] have no replica"),
        (LayerPlan([[0, 1], [2, EMPTY]], [[1, 1], [1, 0.2]], [0, 0, 1]), "empty slot has a non-zero share"),
        (LayerPlan([[0, 1], [2, 1]], [[1, -.5], [1, 1.5]], [0, 0, 1]), "non-negative"),
        (LayerPlan([[0, 1], [2, 1]], [[1, .5], [1, .5]], [0, 0, 0]), "owner is device 0"),
        (LayerPlan([[0, 1], [2, 1]], [[1, .5], [1, .5]], [0, 0, 5]), "owner device ids"),
    ]
    for layer, message in cases:
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            layer.validate(slots)
    with pytest.raises(InputError, match="uses more than its 1 slots"):
        ok.validate(np.array([2, 1]))


def _plan_doc(**changes):
    doc = random_plan(1).to_dict()
    doc.update(changes)
    return doc


@pytest.mark.parametrize("doc, message", [
    ("{not json", "not valid JSON"),
    (_plan_doc(schema="flexmoe.plan/7"), "unsupported schema"),
    ({k: v for k, v in _plan_doc().items() if k != "schema"}, "missing 'schema'"),
    (_plan_doc(slots=[3, 3]), "'slots' lists 2 devices"),
    (_plan_doc(slots=[1, 1, 1, 1], num_experts=6), "fewer than the 6 experts"),
    (_plan_doc(layers=[]), "at least one layer"),
    (_plan_doc(num_devices="four"), "num_devices must be an integer"),
])
def test_bad_plan_files(tmp_path, doc, message):
    assert_rejected(Plan.load, tmp_path / "plan.json", doc, message)


def test_plan_file_with_bad_layer_names_file(tmp_path):
    doc = _plan_doc()
    doc["layers"][1]["shares"][0][0] = float("nan")
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="NaN"):
        Plan.load(p)
    doc = _plan_doc()
    doc["layers"][0]["owner"] = doc["layers"][0]["owner"][:-1]
    p.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"layers\[0\].owner has shape \(5,\), expected \(6,\)"):
        Plan.load(p)


def test_static_layer_is_plain_expert_parallelism():
    layer = static_layer(8, np.array([2, 2, 2, 2]))
    assert layer.assign.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layer.owner.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    layer.validate(np.array([2, 2, 2, 2]))
    uneven = static_layer(5, np.array([3, 1, 3]))
    uneven.validate(np.array([3, 1, 3]))
    assert sorted(uneven.assign[uneven.assign >= 0].tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="fewer than the 9 experts"):
        static_layer(9, np.array([2, 2, 2, 2]))


def test_diff_lists_copies_and_owner_moves():
    c = preset("dgx-a100-2x8", slots=2)  # 16 devices, 2 nodes; static: device g holds expert g
    old = Plan(16, c.slots, [static_layer(16, c.slots)])
    layer = static_layer(16, c.slots)
    layer.assign[1, 1] = layer.assign[9, 1] = 0  # expert 0 gains replicas on device 1 and on device 9
    layer.share[0, 0] = layer.share[1, 1] = layer.share[9, 1] = 1 / 3
    layer.assign[2, 1] = 3  # expert 3 gains a replica on device 2, which becomes its owner
    layer.share[3, 0] = layer.share[2, 1] = 0.5
    layer.owner[3] = 2
    new = Plan(16, c.slots, [layer]).validate()
    moves = sorted((m.kind, m.expert, m.src, m.dst, m.bytes) for m in diff(old, new, c))
    w, o = c.expert.param_bytes, c.expert.optimizer_bytes
    assert moves == [("optimizer", 3, 3, 2, o), ("weights", 0, 0, 1, w), ("weights", 0, 0, 9, w),
                     ("weights", 3, 3, 2, w)]
    assert summarize(diff(old, new, c)) == {"moves": 4, "weight_copies": 3, "owner_moves": 1, "bytes": 3 * w + o}
    assert diff(new, new, c) == []
    with pytest.raises(InputError, match="plans differ in shape"):
        diff(old, Plan(16, c.slots, [static_layer(16, c.slots)] * 2), c)

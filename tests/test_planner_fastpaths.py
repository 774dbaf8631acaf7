"""The planner's fast paths give the numbers of the plain forms they replaced, to the bit: each is
pinned here to that plain form (written out in the test) on random inputs, so a speed-up that
changes a plan or a reported number fails."""

from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest

from cost_models import estimator
from cost_models.presets import preset
from cost_models.routing import class_traffic, dense_nodes, route
from planner import construct, score
from tests.planner_helpers import make_cluster

RNG_SEEDS = range(40)


def _placement(rng, num_exp, num_dev, density=0.15):
    x = rng.random((num_exp, num_dev)) < density
    x[np.arange(num_exp), rng.integers(0, num_dev, num_exp)] = True
    owner = np.array([rng.choice(np.flatnonzero(row)) for row in x])
    return x, owner


def _bits(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64)).view(np.int64)


def _reference_wrap(load, order, a, b, slots, target, light):
    """`construct._wrap` written plainly: a queue of (expert, tokens left), heaviest first; each
    device takes up to `light` whole items off the light end, then items off the heavy end,
    splitting the one that crosses the target. The pieces, or None when items are left over."""
    items = deque([e, load[e]] for e in order)
    pieces = []
    for g, k in enumerate(slots):
        cap, taken = target, 0
        while taken < min(light, k - 1) and len(items) > 1 and a[g] + b[g] * items[-1][1] <= cap:
            e, t = items.pop()
            pieces.append((e, g, t))
            cap -= a[g] + b[g] * t
            taken += 1
        for _ in range(k - taken):
            if not items:
                break
            e, t = items[0]
            if a[g] + b[g] * t > cap + 1e-15:
                part = (cap - a[g]) / b[g]
                if part > 0:
                    pieces.append((e, g, part))
                    items[0][1] = t - part
                break
            items.popleft()
            pieces.append((e, g, t))
            cap -= a[g] + b[g] * t
    return None if items else pieces


def _reference_wrap_tokens(load_arr, a, b, slots):
    """`construct.wrap_tokens` before: the same binary search on the reference fill."""
    lb = float(max((load_arr.sum() + len(load_arr) * (a / b).min()) / (1.0 / b).sum(), 1e-12))
    order = np.argsort(-load_arr, kind="stable").tolist()
    load, a, b, slots = load_arr.tolist(), a.tolist(), b.tolist(), slots.tolist()
    best = None
    k = int(max(slots))
    for light in sorted({0, 1, k // 2, k - 1} & set(range(k)), reverse=True):
        hi = lb if best is None else best[0] * (1 - construct.SEARCH_TOLERANCE)
        lo = lb * 0.999
        found = _reference_wrap(load, order, a, b, slots, hi, light)
        step = 1 / 16
        while found is None and best is None and hi < 1e6 * (lb + 1.0):
            lo, hi, step = hi, lb * (1 + step), 2 * step
            found = _reference_wrap(load, order, a, b, slots, hi, light)
        if found is None:
            continue
        for _ in range(construct.SEARCH_STEPS):
            if hi - lo <= construct.SEARCH_TOLERANCE * hi:
                break
            mid = 0.5 * (lo + hi)
            trial = _reference_wrap(load, order, a, b, slots, mid, light)
            if trial is None:
                lo = mid
            else:
                hi, found = mid, trial
        if best is None or hi < best[0]:
            best = (hi, found)
    x = np.zeros((len(load), len(slots)), dtype=bool)
    y = np.zeros(x.shape)
    for e, g, t in best[1]:
        x[e, g] = True
        y[e, g] += t
    return x, y


@pytest.mark.parametrize("seed", range(12))
def test_wrap_tokens_equals_the_plain_fill(seed):
    rng = np.random.default_rng(seed)
    num_dev = int(rng.integers(1, 24))
    slots = rng.integers(1, 6, num_dev) if seed % 3 else np.full(num_dev, int(rng.integers(1, 6)))
    num_exp = int(rng.integers(1, slots.sum() + 1))
    load = rng.zipf(1.3, num_exp).astype(float) * (rng.random(num_exp) < 0.9)  # some experts idle
    a = rng.random(num_dev) * 1e-4 if seed % 2 else np.zeros(num_dev)
    b = 1e-6 * (1 + rng.random(num_dev)) if seed % 4 else np.full(num_dev, 1e-6)
    x, y = construct.wrap_tokens(load, a, b, slots)
    rx, ry = _reference_wrap_tokens(load, a, b, slots)
    assert np.array_equal(x, rx) and np.array_equal(_bits(y), _bits(ry))


def test_mcnaughton_gives_idle_experts_even_shares():
    c = make_cluster(nodes=1, per_node=4, slots=3)
    load = np.array([500.0, 0.0, 300.0, 0.0, 80.0])
    x, share = construct.mcnaughton(c, load)
    x2, y = construct.wrap_tokens(load, c.compute_a, c.compute_b, c.slots)
    expected = np.where(load[:, None] > 0, y / np.maximum(load[:, None], 1e-300),
                        x / np.maximum(x.sum(axis=1, keepdims=True), 1))
    assert np.array_equal(x, x2) and np.array_equal(_bits(share), _bits(expected))
    assert np.allclose(share.sum(axis=1), 1.0)


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_array_helpers_equal_their_plain_forms(seed):
    rng = np.random.default_rng(seed)
    c = preset("dgx-h100-8x8" if seed % 2 else "dgx-a100-2x8", slots=3)
    num_exp = int(rng.integers(1, 80))
    x, owner = _placement(rng, num_exp, c.num_devices)
    assert all(np.array_equal(u, v) for u, v in zip(estimator.cells(x), np.nonzero(x)))
    assert np.array_equal(estimator.node_replicas(c, x), x @ c.node_onehot)
    assert np.array_equal(_bits(score.even_shares(x)),
                          _bits(np.where(x, 1.0 / np.maximum(x.sum(axis=1, keepdims=True), 1), 0.0)))
    nbytes = rng.random((c.num_devices, c.num_devices)) * 1e6 * (rng.random((c.num_devices,) * 2) < 0.5)
    t = nbytes * c.inv_beta
    intra, inter = np.where(c.inter_mask, 0.0, t), np.where(c.inter_mask, t, 0.0)
    plain = intra.sum(axis=1), intra.sum(axis=0), inter.sum(axis=1), inter.sum(axis=0)
    assert all(np.array_equal(_bits(u), _bits(v)) for u, v in zip(estimator.port_time(c, nbytes), plain))


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_clean_shares_and_pick_owner_equal_their_plain_forms(seed):
    rng = np.random.default_rng(seed)
    c = preset("dgx-h100-8x8", slots=3)
    num_exp = int(rng.integers(1, 60))
    x, owner = _placement(rng, num_exp, c.num_devices)
    share = rng.random(x.shape) - 0.2 * (seed % 2)  # some negative
    if seed % 5 == 0:
        share[0, 0], share[-1, -1] = np.nan, np.inf
    if seed % 7 == 0:
        share[rng.integers(0, num_exp)] = 0.0  # an expert whose shares are all 0: even shares
    fixed = share if np.isfinite(share).all() else np.nan_to_num(share)
    s = np.where(x, np.clip(fixed, 0.0, None), 0.0)
    tot = s.sum(axis=1, keepdims=True)
    plain = np.where(tot > score.EPS, s / np.maximum(tot, score.EPS), score.even_shares(x))
    cleaned = score.clean_shares(x, share)
    assert np.array_equal(_bits(cleaned), _bits(plain))
    for current in (None, SimpleNamespace(owner=rng.integers(0, c.num_devices, num_exp))):
        got = score.pick_owner(c, x, cleaned, current)  # reads only the current plan's owners
        # the plain form: keep the current owner where it still holds a replica, else the key's argmax
        want = np.zeros(num_exp, dtype=np.int64)
        todo = np.ones(num_exp, dtype=bool)
        if current is not None:
            keep = x[np.arange(num_exp), current.owner]
            want[keep], todo = current.owner[keep], ~keep
        same = np.take(x @ c.node_onehot, c.node_index, axis=1)
        key = np.where(x, same * 10.0 + cleaned, -np.inf)
        want[todo] = np.argmax(key[todo], axis=1)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_migration_transfers_equal_the_plain_rule(seed):
    """A new replica copies from the first old holder on its node, else from the old owner."""
    rng = np.random.default_rng(seed)
    c = preset("dgx-h100-8x8" if seed % 2 else "dgx-a100-2x8", slots=3)
    num_exp = int(rng.integers(1, 60))
    (old_x, old_owner), (new_x, new_owner) = _placement(rng, num_exp, c.num_devices), _placement(
        rng, num_exp, c.num_devices)
    if seed % 3 == 0:
        new_x, new_owner = old_x | new_x, old_owner  # only new replicas, no owner moves
    es, gs = np.nonzero(new_x & ~old_x)
    near = old_x[es] & (c.node_of[None, :] == c.node_of[gs][:, None])
    src = np.where(near.any(axis=1), near.argmax(axis=1), old_owner[es])
    moved = np.flatnonzero(new_owner != old_owner)
    got = estimator._transfers(c, old_x, old_owner, new_x, new_owner)
    want = (np.concatenate([es, moved]), np.concatenate([src, old_owner[moved]]),
            np.concatenate([gs, new_owner[moved]]), np.arange(len(es) + len(moved)) < len(es))
    assert all(np.array_equal(u, v) for u, v in zip(got, want))


@pytest.mark.parametrize("shape", [(1, 5), (6, 1), (4, 7)])
def test_routing_leaves_its_inputs_untouched(shape):
    """The first stage works in place on its own copy of the counts, never on the caller's."""
    rng = np.random.default_rng(sum(shape))
    num_dev, num_exp = shape
    counts = rng.integers(0, 50, shape).astype(float)
    x, _ = _placement(rng, num_exp, num_dev, 0.5)
    share = score.even_shares(x)
    before_c, before_s = counts.copy(), share.copy()
    nodes = np.arange(num_dev) // 2
    route(counts, share, nodes)
    class_traffic(counts, share, nodes)
    class_traffic(counts, share)
    assert np.array_equal(counts, before_c) and np.array_equal(share, before_s)


def test_cluster_caches_equal_their_plain_forms():
    c = preset("dgx-h100-8x8", slots=3)
    n = c.num_devices
    intra = ~c.inter_mask & ~np.eye(n, dtype=bool)
    invb = np.minimum(c.inv_beta, c.inv_beta.T)
    ci, co = c.cheapest_inv_beta
    assert np.array_equal(ci, np.where(intra, invb, np.inf).min(axis=1))
    assert np.array_equal(co, np.where(c.inter_mask, invb, np.inf).min(axis=1))
    assert np.array_equal(c.class_inv_beta, np.stack([np.where(c.inter_mask, 0.0, c.inv_beta),
                                                      np.where(c.inter_mask, c.inv_beta, 0.0)]))
    assert c.num_nodes == len(set(c.node_of.tolist()))
    for cached in (ci, co, c.class_inv_beta):
        assert not cached.flags.writeable  # shared by every caller: nobody may change them


def test_dense_nodes_equals_unique_numbering():
    """Ids already numbered 0..K-1 pass through unsorted; any others are renumbered as `unique` does."""
    rng = np.random.default_rng(3)
    cases = [[0, 0, 1, 1], [1, 0, 1, 0], [0, 2], [5, 5, 9], [3, 3], [-1, 0], [0.0, 1.0]]
    cases += [rng.integers(0, k, n) for k in (1, 2, 5) for n in (1, 4, 9)]
    for ids in cases:
        assert np.array_equal(dense_nodes(ids), np.unique(np.asarray(ids), return_inverse=True)[1].reshape(-1))


def test_a_plans_terms_array_serves_the_next_plan_and_never_two_states_at_once():
    """The greedy's per-expert terms array is handed from plan to plan in a thread; a state made
    while another holds it gets its own, and the plan is the same either way."""
    from planner import greedy
    c = make_cluster(nodes=2, per_node=2, slots=3)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 500, (4, 6)).astype(float)
    x, owner = _placement(rng, 6, 4, 0.3)
    greedy._spare.terms = None
    first = greedy.greedy(c, counts)
    handed = greedy._spare.terms
    assert handed is not None and handed.shape == (6, 7, 4)
    a = greedy._State(c, counts, x, owner, x, owner, 50)
    b = greedy._State(c, counts, x, owner, x, owner, 50)
    assert a.terms_e is handed and b.terms_e is not handed
    assert np.array_equal(a.terms_e, b.terms_e)
    again = greedy.greedy(c, counts)  # with a fresh array (a holds the handed one)
    assert all(np.array_equal(u, v) for u, v in zip(first[:3], again[:3]))


def _reference_water(base, b, amount):
    """`construct._water` before: every sum a list through `_sum` (numpy's summation order)."""
    order = sorted(range(len(base)), key=base.__getitem__)
    bs, ws = [base[i] for i in order], [1.0 / b[i] for i in order]
    n, level = len(bs), bs[0]
    for j in range(n):
        cap = construct._sum([(bs[j + 1] - bs[k]) * ws[k] for k in range(j + 1)]) if j + 1 < n else np.inf
        if cap >= amount:
            level = (amount + construct._sum([bs[k] * ws[k] for k in range(j + 1)])) / construct._sum(ws[:j + 1])
            break
    out = [0.0] * n
    for k, i in enumerate(order):
        out[i] = max((level - bs[k]) * ws[k], 0.0)
    s = construct._sum(out)
    return [v * (amount / s) for v in out] if s > 0 else out


def test_water_equals_its_plain_form_to_the_bit():
    """`construct._water` writes its short sums out in loops: the same tokens to the last bit as
    the plain form that passes every sum through `_sum`."""
    rng = np.random.default_rng(4)
    for case in range(4000):
        n = int(rng.integers(1, 20))
        base = (rng.random(n) * rng.choice([1e-3, 1.0])).tolist()
        if case % 5 == 0:
            base = [base[0]] * n  # ties
        b = (rng.random(n) * 1e-6 + 1e-9).tolist()
        amount = float(rng.integers(0, 100000)) if case % 7 else 0.0
        assert _bits(construct._water(base, b, amount)).tolist() == _bits(_reference_water(base, b, amount)).tolist()

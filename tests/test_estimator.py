"""The estimator on small cases whose expected values are worked out by hand in each test."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.cluster import INTER, INTRA, Cluster, ComputeModel, Device, ExpertShape, Link
from cost_models.estimator import (estimate, fold_sources, lower_bound, migration_seconds, migration_time,
                                  migration_transfers)
from cost_models.routing import route
from cost_models.files import InputError

# hidden 2, ffn 3, fp32: a token is 8 bytes; a replica has 17 parameters = 68 bytes, Adam state 204.
EXPERT = ExpertShape(2, 3, "fp32")
INTRA_LINK = Link(alpha=0.01, beta=100.0)  # 0.01 s per byte
INTER_LINK = Link(alpha=0.1, beta=10.0)  # 0.1 s per byte


def cluster(nodes=(0, 0), pairs=None, a=(1.0, 2.0), b=(0.5, 0.25)):
    devices = tuple(Device(i, n, "test", 2**30, 4, ComputeModel(a[i], b[i])) for i, n in enumerate(nodes))
    links = {INTRA: INTRA_LINK, INTER: INTER_LINK} if len(set(nodes)) > 1 else {INTRA: INTRA_LINK}
    return Cluster("test", devices, EXPERT, links, pairs or {})


COUNTS = np.array([[4, 2], [6, 8]])  # counts[source, expert]
STATIC_X = np.array([[True, False], [False, True]])  # expert 0 on device 0, expert 1 on device 1
STATIC_SHARE = STATIC_X.astype(float)


def test_static_placement_one_node():
    b = estimate(cluster(), COUNTS, STATIC_X, STATIC_SHARE)
    # Each device serves 10 tokens. compute: 1 + 0.5*10 = 6 and 2 + 0.25*10 = 4.5.
    np.testing.assert_allclose(b.tokens, [10, 10])
    np.testing.assert_allclose(b.compute, [6.0, 4.5])
    # Source 0 sends 2 tokens (16 B) to device 1, source 1 sends 6 (48 B) to device 0: 0.16 s and 0.48 s.
    # Each of 4 phases costs max(send, recv) = 0.48 s, plus one latency (0.01 s) per peer and phase.
    np.testing.assert_allclose(b.a2a, [4 * 0.48 + 4 * 0.01] * 2)
    np.testing.assert_allclose(b.a2a_send_intra, [2 * (0.16 + 0.48)] * 2)
    np.testing.assert_allclose(b.a2a_send_inter, [0, 0])
    np.testing.assert_allclose(b.sync, [0, 0])
    np.testing.assert_allclose(b.total, [7.96, 6.46])
    assert b.step_time == pytest.approx(7.96) and b.straggler == 0 and b.balance == pytest.approx(1.0)
    s = b.summary()
    assert s["step_time_s"] == pytest.approx(7.96) and s["compute_s"] == pytest.approx(6.0)


def test_replicated_expert_with_owner_sync():
    x = np.array([[True, True], [False, True]])
    share = np.array([[0.5, 0.5], [0.0, 1.0]])
    b = estimate(cluster(), COUNTS, x, share, owner=np.array([0, 1]))
    # Device 0 serves 5 tokens of expert 0; device 1 serves 5 of expert 0 and 10 of expert 1.
    np.testing.assert_allclose(b.tokens, [5, 15])
    np.testing.assert_allclose(b.compute, [1 + 0.5 * 5, 2 * 2 + 0.25 * 15])
    # Local first: source 0 keeps its 4 tokens of expert 0 (share 5), source 1 keeps 5 of its 6 and
    # sends 1 to device 0; expert 1's 2 tokens from source 0 go to device 1. 8 B and 16 B.
    np.testing.assert_allclose(b.a2a, [4 * 0.16 + 0.04] * 2)
    # Device 1's replica of expert 0 sends its gradient (68 B, 0.68 s) to owner 0; only then can
    # the owner send the weights back (another 0.68 s): two phases in sequence for both devices.
    np.testing.assert_allclose(b.sync, [1.36, 1.36])
    np.testing.assert_allclose(b.total, [3.5 + 0.68 + 1.36, 7.75 + 0.68 + 1.36])
    assert b.straggler == 1 and b.balance == pytest.approx(1.5)


def test_two_nodes_use_the_inter_link():
    b = estimate(cluster(nodes=(0, 1)), COUNTS, STATIC_X, STATIC_SHARE)
    # Same bytes as the one-node case at 0.1 s per byte: phases of 4.8 s, latency 0.1 s.
    np.testing.assert_allclose(b.a2a, [4 * 4.8 + 4 * 0.1] * 2)
    np.testing.assert_allclose(b.a2a_send_inter, [2 * (1.6 + 4.8)] * 2)
    np.testing.assert_allclose(b.a2a_send_intra, [0, 0])


def test_directed_pair_override():
    c = cluster(pairs={(0, 1): Link(alpha=0.02, beta=50.0)})
    np.testing.assert_allclose(c.alpha, [[0, 0.02], [0.01, 0]])
    np.testing.assert_allclose(c.inv_beta, [[0, 0.02], [0.01, 0]])
    b = estimate(c, COUNTS, STATIC_X, STATIC_SHARE)
    # Dispatch: 16 B 0->1 at 0.02 s/B = 0.32, 48 B 1->0 at 0.01 = 0.48.
    # Combine: 48 B 0->1 = 0.96, 16 B 1->0 = 0.16. Two of each phase.
    # Device 0: 2*(max(0.32, 0.48) + max(0.96, 0.16)) + 4*0.02; device 1 the same + 4*0.01.
    np.testing.assert_allclose(b.a2a, [2 * (0.48 + 0.96) + 0.08, 2 * (0.48 + 0.96) + 0.04])


def test_route_local_first():
    local, remote = route(COUNTS, np.array([[0.5, 0.5], [0.0, 1.0]]))
    np.testing.assert_allclose(local, [[4, 5], [0, 8]])
    np.testing.assert_allclose(remote, [[0, 2], [1, 0]])


def test_route_splits_the_rest_by_remaining_capacity():
    # One expert, three devices; replicas on devices 1 and 2 with shares 0.25 and 0.75.
    # Source 0 (no replica) sends 8 tokens, sources 1 and 2 send 0: demand 2 and 6, all remote.
    local, remote = route(np.array([[8], [0], [0]]), np.array([[0.0, 0.25, 0.75]]))
    np.testing.assert_allclose(local, [[0, 0, 0]])
    np.testing.assert_allclose(remote, [[0, 2, 6], [0, 0, 0], [0, 0, 0]])


def test_fold_sources():
    c = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
    np.testing.assert_allclose(fold_sources(c, 2), [[4, 6], [12, 14]])  # pairs of sources summed
    np.testing.assert_allclose(fold_sources(np.array([[2, 4]]), 2), [[1, 2], [1, 2]])  # split evenly
    # Three sources on two devices: the middle one straddles both halves.
    np.testing.assert_allclose(fold_sources(np.array([[3, 0], [6, 6], [0, 9]]), 2), [[6, 3], [3, 12]])
    assert fold_sources(c, 4) is not None and np.array_equal(fold_sources(c, 4), c)


def test_lower_bound():
    # 20 tokens, 2 experts; a/b = 2 and 8, 1/b = 2 and 4: (20 + 2*2) / (2 + 4) = 4.
    assert lower_bound(cluster(), COUNTS) == pytest.approx(4.0)


def test_migration_transfers_and_time():
    c = cluster(nodes=(0, 0, 1), a=(1, 1, 1), b=(1, 1, 1))
    old_x = np.array([[True, False, False], [False, False, True]])
    new_x = np.array([[True, True, True], [False, True, True]])
    t = migration_transfers(c, old_x, np.array([0, 2]), new_x, np.array([0, 1]))
    assert t == [(0, 0, 1, "weights", 68),  # a copy on the same node is preferred
                 (0, 0, 2, "weights", 68),  # none on node 1: from the owner
                 (1, 2, 1, "weights", 68),
                 (1, 2, 1, "optimizer", 204)]
    # Device 1 receives 68 B intra (0.68 s) and 272 B inter (27.2 s), and takes part in transfers
    # with latencies 0.01 + 0.1 + 0.1: 28.09 s, the busiest device.
    assert migration_time(c, t) == pytest.approx(0.68 + 27.2 + 0.21)
    assert migration_time(c, []) == 0.0


def test_migration_seconds_is_the_time_of_the_transfers():
    """The planners' array path gives exactly the seconds of the listed transfers."""
    c = cluster(nodes=(0, 0, 1, 1), a=(1, 1, 1, 1), b=(1, 1, 1, 1))
    rng = np.random.default_rng(4)
    for _ in range(50):
        xs, owners = [], []
        for _ in range(2):
            x = rng.random((6, 4)) < 0.3
            x[np.arange(6), rng.integers(0, 4, 6)] = True
            xs.append(x)
            owners.append(np.array([rng.choice(np.flatnonzero(row)) for row in x]))
        t = migration_transfers(c, xs[0], owners[0], xs[1], owners[1])
        assert migration_seconds(c, xs[0], owners[0], xs[1], owners[1]) == migration_time(c, t)
    assert migration_seconds(c, xs[0], owners[0], xs[0], owners[0]) == 0.0


def test_shape_mismatch_is_input_error():
    with pytest.raises(InputError):
        estimate(cluster(), COUNTS, STATIC_X[:, :1], STATIC_SHARE[:, :1])
    with pytest.raises(InputError):
        estimate(cluster(), np.ones((2, 3)), STATIC_X, STATIC_SHARE)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_step_time_never_beats_the_lower_bound(num_devices, num_experts, seed):
    rng = np.random.default_rng(seed)
    devices = tuple(Device(i, i // 2, "t", 2**30, num_experts, ComputeModel(rng.uniform(0, 1), rng.uniform(0.1, 1)))
                    for i in range(num_devices))
    c = Cluster("t", devices, EXPERT, {INTRA: INTRA_LINK, INTER: INTER_LINK})
    counts = rng.integers(0, 50, size=(num_devices, num_experts))
    x = rng.random((num_experts, num_devices)) < 0.5
    x[np.arange(num_experts), rng.integers(0, num_devices, num_experts)] = True
    share = x * rng.random(x.shape) + x * 1e-3
    share /= share.sum(axis=1, keepdims=True)
    b = estimate(c, counts, x, share)
    assert b.step_time >= lower_bound(c, counts) * (1 - 1e-9)
    local, remote = route(counts, share)
    # Tokens are conserved: every source's tokens are kept or sent, every replica gets its demand.
    sent_by_source = remote.sum(axis=1) + local.sum(axis=0)
    np.testing.assert_allclose(sent_by_source, counts.sum(axis=1), atol=1e-6)
    np.testing.assert_allclose(remote.sum(axis=0) + local.sum(axis=0), b.tokens, atol=1e-6)


# --- hierarchical routing: device-local, then the own node, then other nodes -----------------------
TWO_NODES = (0, 0, 1, 1)  # devices 0, 1 on node 0; devices 2, 3 on node 1


def test_route_hierarchical_stays_inside_the_node_when_it_can():
    # One expert, 12 tokens from sources [4, 2, 6, 0]; replicas on devices 1, 2, 3 serve 6, 3, 3.
    # Local: source 1 keeps 2, source 2 keeps 3. Rest [4, 0, 3, 0], spare capacity [0, 4, 0, 3].
    # Node 0 absorbs source 0's 4 tokens on device 1; node 1 absorbs source 2's 3 on device 3.
    counts, share = np.array([[4], [2], [6], [0]]), np.array([[0.0, 0.5, 0.25, 0.25]])
    local, remote = route(counts, share, np.array(TWO_NODES))
    np.testing.assert_allclose(local, [[0, 2, 3, 0]])
    np.testing.assert_allclose(remote, [[0, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3], [0, 0, 0, 0]])
    # the node-blind rule spreads both over all spare capacity (4 and 3 out of 7)
    _, flat = route(counts, share)
    np.testing.assert_allclose(flat[0], [0, 16 / 7, 0, 12 / 7])


def test_route_hierarchical_sends_only_the_overflow_across():
    # Sources [8, 0, 0, 4]; replicas on devices 1, 2, 3 serve 3, 6, 3. Source 3 keeps 3 locally.
    # Node 0: rest 8, capacity 3: 3 tokens to device 1, 5 left. Node 1: rest 1 (source 3), capacity
    # 6 (device 2): 1 token to device 2, which has 5 left, and they take node 0's overflow.
    counts, share = np.array([[8], [0], [0], [4]]), np.array([[0.0, 0.25, 0.5, 0.25]])
    local, remote = route(counts, share, np.array(TWO_NODES))
    np.testing.assert_allclose(local, [[0, 0, 0, 3]])
    np.testing.assert_allclose(remote, [[0, 3, 5, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])
    # node-blind: 8 * 3/9 and 8 * 6/9 from source 0, 1/3 and 2/3 from source 3: 5 2/3 cross, not 5
    _, flat = route(counts, share)
    inter = np.array(TWO_NODES)[:, None] != np.array(TWO_NODES)[None, :]
    assert flat[inter].sum() == pytest.approx(17 / 3) and remote[inter].sum() == pytest.approx(5)


def test_estimate_uses_the_hierarchical_route():
    c = cluster(nodes=TWO_NODES, a=(1, 1, 1, 1), b=(1, 1, 1, 1))
    counts, share = np.array([[4], [2], [6], [0]]), np.array([[0.0, 0.5, 0.25, 0.25]])
    b = estimate(c, counts, share > 0, share)
    # Only intra-node traffic: 4 tokens (32 B, 0.32 s) 0 -> 1 and 3 tokens (24 B, 0.24 s) 2 -> 3.
    # Each phase costs device 0 max(send, recv) = 0.32 s; latency: one intra and two inter peers.
    np.testing.assert_allclose(b.a2a_send_inter, 0.0)
    np.testing.assert_allclose(b.a2a[0], 4 * 0.32 + 4 * (0.01 + 0.1 + 0.1))
    np.testing.assert_allclose(b.a2a[3], 4 * 0.24 + 4 * (0.01 + 0.1 + 0.1))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_route_hierarchical_properties(num_devices, num_experts, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 30, size=(num_devices, num_experts))
    x = rng.random((num_experts, num_devices)) < 0.5
    x[np.arange(num_experts), rng.integers(0, num_devices, num_experts)] = True
    share = x * rng.random(x.shape) + x * 1e-3
    share /= share.sum(axis=1, keepdims=True)
    flat_local, flat = route(counts, share)
    # one node: exactly the node-blind rule
    one_local, one = route(counts, share, np.zeros(num_devices, dtype=int))
    np.testing.assert_allclose(one, flat, atol=1e-9)
    np.testing.assert_allclose(one_local, flat_local)
    nodes = np.sort(rng.integers(0, 3, num_devices))
    local, remote = route(counts, share, nodes)
    np.testing.assert_allclose(local, flat_local)
    assert (remote >= -1e-9).all() and np.allclose(np.diag(remote), 0)
    # conservation: every source sends all its tokens, every replica gets exactly its demand
    np.testing.assert_allclose(remote.sum(axis=1) + local.sum(axis=0), counts.sum(axis=1), atol=1e-6)
    np.testing.assert_allclose(remote.sum(axis=0) + local.sum(axis=0), counts.sum(axis=0) @ share, atol=1e-6)
    # nothing crosses nodes that could have stayed: never more inter-node tokens than node-blind
    inter = nodes[:, None] != nodes[None, :]
    assert remote[inter].sum() <= flat[inter].sum() + 1e-6


@pytest.mark.parametrize("nodes", [(0, 0, 0), (0, 0, 1, 1), (3, 3, 7, 7, 9, 9), (0,)])
def test_one_bandwidth_per_class_gives_the_matrix_numbers(nodes, monkeypatch):
    """On a cluster with one bandwidth per link class the estimate takes each device's class totals
    (`class_a2a_seconds`); a pair that differs sends it back to the [src, dst] matrix. Either way
    the numbers are the matrix's (up to rounding; to the bit on the matrix path)."""
    from cost_models import estimator as estimator_module
    from cost_models.estimator import a2a_seconds
    rng = np.random.default_rng(len(nodes))
    n = len(nodes)
    odd = [({(0, n - 1): Link(alpha=0.01, beta=50.0)}, False)] if n > 1 else []
    for pairs, uniform in [({}, True)] + odd:
        c = cluster(nodes=nodes, pairs=pairs, a=[1.0] * n, b=[0.5] * n)
        assert (c.uniform_inv_beta is not None) == uniform
        for _ in range(5):
            counts = rng.integers(0, 50, (n, 5)).astype(float)
            x = rng.random((5, n)) < 0.4
            x[np.arange(5), rng.integers(0, n, 5)] = True
            share = x * rng.random((5, n))
            share /= share.sum(axis=1, keepdims=True)
            if uniform:  # no [src, dst] matrix is made
                monkeypatch.setattr(estimator_module, "route", None)
            b = estimate(c, counts, x, share)
            monkeypatch.undo()
            ports, a2a = a2a_seconds(c, route(counts, share, c.node_of)[1])
            got = (b.a2a_send_intra, b.a2a_recv_intra, b.a2a_send_inter, b.a2a_recv_inter)
            if uniform:
                np.testing.assert_allclose(b.a2a, a2a, rtol=1e-12)
                for u, v in zip(got, ports):
                    np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-15)
            else:
                assert np.array_equal(b.a2a, a2a) and all(np.array_equal(u, v) for u, v in zip(got, ports))

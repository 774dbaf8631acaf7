"""The one dispatcher (`cost_models.routing`): whole-token routing pinned to a plain per-expert
reference, the fractional rule it shares with the estimator, and the runtime's views of a table."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.routing import apportion, class_traffic, route, route_table, route_tokens


def reference_route(counts, share, nodes=None):
    """The rule written out one expert at a time, with plain loops (the module vectorises it)."""
    counts = np.asarray(counts, dtype=np.int64)
    num_dev, num_exp = counts.shape
    node = np.zeros(num_dev, dtype=np.int64) if nodes is None else np.asarray(nodes)

    def transport(send, recv):  # proportional floor, then the north-west corner on what is left
        f = np.zeros((len(send), len(recv)), dtype=np.int64)
        if recv.sum() == 0:
            return f
        f += np.outer(send, recv) // recv.sum()
        row, col = send - f.sum(1), recv - f.sum(0)
        for s in range(len(send)):
            g = 0
            while row[s] > 0:
                while col[g] == 0:
                    g += 1
                k = min(row[s], col[g])
                f[s, g] += k
                row[s] -= k
                col[g] -= k
        return f

    flow = np.zeros((num_dev, num_exp, num_dev), dtype=np.int64)
    for e in range(num_exp):
        c = counts[:, e]
        demand = apportion(int(c.sum()), share[e])
        local = np.minimum(c, demand)
        rest, cap = c - local, demand - local
        f = np.zeros((num_dev, num_dev), dtype=np.int64)
        if nodes is not None:
            for k in np.unique(node):
                m = np.flatnonzero(node == k)
                moved = int(min(rest[m].sum(), cap[m].sum()))
                if moved:
                    send, recv = apportion(moved, rest[m]), apportion(moved, cap[m])
                    f[np.ix_(m, m)] += transport(send, recv)
                    rest[m] -= send
                    cap[m] -= recv
        f += transport(rest, cap)
        f[np.arange(num_dev), np.arange(num_dev)] += local
        flow[:, e, :] = f
    return flow


def random_case(seed, num_dev, num_exp, num_nodes):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 60, (num_dev, num_exp)) * (rng.random((num_dev, num_exp)) < 0.7)
    x = rng.random((num_exp, num_dev)) < 0.4
    x[np.arange(num_exp), rng.integers(0, num_dev, num_exp)] = True
    share = np.where(x, rng.random(x.shape) + 0.05, 0.0)
    share /= share.sum(axis=1, keepdims=True)
    nodes = None if num_nodes == 0 else np.arange(num_dev) * num_nodes // num_dev
    return counts, share, nodes


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 8), st.integers(1, 6), st.integers(0, 3))
def test_whole_tokens_equal_the_plain_reference(seed, num_dev, num_exp, num_nodes):
    counts, share, nodes = random_case(seed, num_dev, num_exp, num_nodes)
    assert np.array_equal(route_tokens(counts, share, nodes), reference_route(counts, share, nodes))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 8), st.integers(1, 6), st.integers(0, 3))
def test_whole_and_fractional_routing_differ_only_by_rounding(seed, num_dev, num_exp, num_nodes):
    counts, share, nodes = random_case(seed, num_dev, num_exp, num_nodes)
    flow = route_tokens(counts, share, nodes)
    local, remote = route(counts, share, nodes)
    assert (flow.sum(axis=2) == counts).all()  # every source sends exactly its tokens
    served = flow.sum(axis=0)  # [expert, device]
    assert (served == apportion(counts.sum(axis=0), share)).all()  # every replica its rounded share
    assert (served[share == 0] == 0).all()
    kept = np.einsum("geg->eg", flow)
    assert np.abs(kept - local).max() < 1.0 + 1e-9  # a rounded demand moves what a source keeps by < 1
    sent = flow.sum(axis=1).astype(float)
    np.fill_diagonal(sent, 0.0)
    # per expert and link, rounding the demand, what is kept and the split each move < 1 token, and
    # the north-west corner places what floors left (< one token per replica) on few links
    assert np.abs(sent - remote).max() <= num_exp * (num_dev + 2)
    assert np.isclose(remote.sum() + local.sum(), counts.sum())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 8), st.integers(1, 6), st.integers(0, 3))
def test_the_fast_fractional_form_equals_the_table_in_fractional_tokens(seed, num_dev, num_exp, num_nodes):
    counts, share, nodes = random_case(seed, num_dev, num_exp, num_nodes)
    local, remote = route(counts, share, nodes)
    table = route_table(counts, share > 0, share, nodes, whole=False)
    np.testing.assert_allclose(remote, table.remote(), atol=1e-9)
    kept = np.zeros_like(local)
    for e, j in zip(*np.nonzero(table.dev >= 0)):
        kept[e, table.dev[e, j]] = table.tokens[e, table.dev[e, j], j]
    np.testing.assert_allclose(local, kept, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 8), st.integers(1, 6), st.integers(0, 3))
def test_class_traffic_is_what_route_sends_inside_and_across_nodes(seed, num_dev, num_exp, num_nodes):
    counts, share, nodes = random_case(seed, num_dev, num_exp, num_nodes)
    _, remote = route(counts, share, nodes)
    node = np.zeros(num_dev, dtype=np.int64) if nodes is None else nodes
    cross = node[:, None] != node[None, :]
    inside, across = np.where(cross, 0.0, remote), np.where(cross, remote, 0.0)
    want = np.stack([inside.sum(1), inside.sum(0), across.sum(1), across.sum(0)])
    served, traffic = class_traffic(counts, share, nodes)
    np.testing.assert_allclose(traffic, want, atol=1e-9)
    np.testing.assert_allclose(served, counts.sum(axis=0) @ share, atol=1e-9)


def test_table_views_agree_with_the_dense_flow():
    counts, share, nodes = random_case(7, 6, 5, 2)
    table = route_table(counts, share > 0, share, nodes)
    flow = table.dense()
    for g in range(6):
        assert np.array_equal(table.sent_by(g), flow[g])
        assert np.array_equal(table.received_by(g), flow[:, :, g])
    remote = flow.sum(axis=1)
    np.fill_diagonal(remote, 0)
    assert np.array_equal(table.remote(), remote)


def test_node_first_keeps_tokens_inside_the_node():
    # devices 0, 1 on node 0 and 2, 3 on node 1; expert 0 has replicas on devices 1 and 3
    share = np.array([[0.0, 0.5, 0.0, 0.5]])
    counts = np.array([[6], [0], [6], [0]])
    flow = route_tokens(counts, share, np.array([0, 0, 1, 1]))
    assert flow[0, 0].tolist() == [0, 6, 0, 0] and flow[2, 0].tolist() == [0, 0, 0, 6]
    assert route_tokens(counts, share)[0, 0].tolist() == [0, 3, 0, 3]  # one node: spread by capacity


def test_a_source_keeps_its_tokens_on_its_own_replica_first():
    flow = route_tokens(np.array([[10], [10]]), np.array([[0.5, 0.5]]))
    assert flow[0, 0, 0] == 10 and flow[1, 0, 1] == 10 and flow[0, 0, 1] == 0


def test_apportion_rows_by_largest_remainder():
    assert apportion(5, np.array([1.0, 1.0, 1.0])).tolist() == [2, 2, 1]  # ties by index
    assert apportion(np.array([7, 0]), np.array([[1.0, 2.0], [1.0, 1.0]])).tolist() == [[2, 5], [0, 0]]
    assert apportion(3, np.zeros(2)).tolist() == [0, 0]

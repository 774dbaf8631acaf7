"""planner/layout.py: a node structure laid out on devices by a program per node."""

from __future__ import annotations

import numpy as np
import pytest

from cost_models.estimator import sync_seconds
from planner.layout import layout
from tests.planner_helpers import spread
from tests.test_bounds import slow_cluster


def _structure(rng, cluster, E):
    """A random node structure that fits: replicas per node, owner node, tokens per node."""
    K, m = cluster.num_nodes, [len(d) for d in cluster.node_devices]
    n = np.zeros((E, K), dtype=np.int64)
    free = np.array([int(cluster.slots[d].sum()) for d in cluster.node_devices])
    own = np.zeros(E, dtype=np.int64)
    for e in range(E):  # each owner on a node with a slot left
        own[e] = rng.choice(np.flatnonzero(free > 0))
        free[own[e]] -= 1
    n[np.arange(E), own] = 1
    for k in range(K):
        room = int(cluster.slots[cluster.node_devices[k]].sum()) - n[:, k].sum()
        for e in rng.permutation(E)[:max(room, 0)]:
            if n[e, k] < m[k] and rng.random() < 0.6:
                n[e, k] += 1
    load = rng.integers(10, 300, E).astype(float)
    w = np.where(n > 0, rng.random(n.shape) + 0.1, 0.0)
    return n, own, load[:, None] * w / w.sum(axis=1, keepdims=True), load


@pytest.mark.parametrize("seed", range(6))
def test_layout_keeps_the_node_structure(seed):
    """Replicas per node, the owner on its node, each node's tokens of each expert, the slots."""
    rng = np.random.default_rng(seed)
    cluster = slow_cluster(per_node=(3, 2), slots=2)
    E = 6
    n, own, tokens, load = _structure(rng, cluster, E)
    counts = spread(np.rint(load).astype(int), cluster.num_devices, seed=seed).astype(float)
    tokens *= counts.sum(axis=0)[:, None] / tokens.sum(axis=1, keepdims=True)  # the counts' totals
    x, share, owner = layout(cluster, counts, n, own, tokens, seconds=10.0)
    node = cluster.node_index
    per_node = np.stack([x[:, d].sum(axis=1) for d in cluster.node_devices], axis=1)
    assert np.array_equal(per_node, n)
    assert (x.sum(axis=0) <= cluster.slots).all()
    assert x[np.arange(E), owner].all() and np.array_equal(node[owner], own)
    served = counts.sum(axis=0)[:, None] * share
    assert np.allclose(np.stack([served[:, d].sum(axis=1) for d in cluster.node_devices], axis=1), tokens,
                       rtol=1e-6, atol=1e-6)
    assert np.allclose(share.sum(axis=1), 1) and (share[~x] == 0).all()


def _owner_with_followers_across(counts, tokens):
    """Two nodes of two devices, two slots each. Expert 0 is owned on node 0 with two followers on
    node 1; expert 1 owned on node 1 with a follower on node 0; experts 2 and 3 on node 0 only,
    expert 4 on node 1 only. (cluster, the layout of these, `counts[source, expert]` given)."""
    cluster = slow_cluster(per_node=(2, 2), slots=2)
    n = np.array([[1, 2], [1, 1], [1, 0], [1, 0], [0, 1]])
    own = np.array([0, 1, 0, 0, 1])
    return cluster, layout(cluster, np.asarray(counts, float), n, own, np.asarray(tokens, float), seconds=10.0)


def test_layout_pairs_an_owner_with_a_follower_across():
    """On one device the owner's and the follower's syncs overlap (the larger of 1 sent and 2
    received), apart they add up; experts 2 and 3, wanted by node 0's sources only, take the other
    device."""
    cluster, (x, share, owner) = _owner_with_followers_across(
        [[3, 3, 30, 30, 0], [2, 2, 30, 30, 0], [5, 2, 0, 0, 30], [5, 3, 0, 0, 30]],
        [[5, 10], [5, 5], [60, 0], [60, 0], [0, 60]])
    assert owner[0] in (0, 1) and x[1, owner[0]], x
    sync = sync_seconds(cluster, x, owner)
    assert sync[1 - owner[0]] == 0 and sync[:2].max() == sync[owner[0]]


def test_layout_keeps_a_busy_owner_light():
    """The owner of expert 0 receives from its two followers on node 1 (two slow sync units on one
    device): the right layout gives it the light expert 3 (323.6 us by the estimator), not a
    heavy one, not even the follower of expert 1 whose send its receipts would hide (340.4 us);
    a model that forgot the owner's receipts would balance node 0's tokens instead."""
    _, (x, share, owner) = _owner_with_followers_across(
        [[3, 25, 25, 3, 0], [2, 25, 25, 2, 0], [5, 0, 0, 0, 30], [5, 0, 0, 0, 30]],
        [[5, 10], [50, 0], [50, 0], [5, 0], [0, 60]])
    assert owner[0] in (0, 1) and x[3, owner[0]] and not x[[1, 2], owner[0]].any(), x


def test_layout_refuses_a_structure_that_does_not_fit():
    cluster = slow_cluster(per_node=(2, 1), slots=1)
    n = np.array([[2, 1], [1, 0]])  # three replicas on node 0's two single-slot devices
    counts = spread([50, 40], cluster.num_devices).astype(float)
    assert layout(cluster, counts, n, np.array([0, 0]), np.array([[30.0, 20.0], [40.0, 0.0]])) is None

"""The profiler: fitting synthetic measurements into a cluster, and a real --quick run (world size 2)."""

import json
import time

import numpy as np
import pytest

from cost_models.cluster import INTER, INTRA, Cluster, ExpertShape
from cost_models.files import InputError
from cost_models.profiler import ProfileOptions, build_cluster, profile
from cost_models.routing import apportion, route, route_tokens
from experiments.validate_estimator import cases
from flexmoe.cli import main


def synthetic(hosts, a=1e-3, b=3e-5, alphas=None, beta=2e9):
    """Measurements as the workers report them, from known models (no noise)."""
    world = len(hosts)
    tokens = [1, 16, 256, 4096]
    sizes = [2**10, 2**16, 2**20, 2**26]
    ranks = []
    for r, host in enumerate(hosts):
        links = []
        if r == 0:
            for j in range(1, world):
                alpha = (alphas or {}).get((0, j), 5e-5 if hosts[j] == hosts[0] else 2e-4)
                links += [[0, j, s, alpha + s / beta] for s in sizes]
        ranks.append({"rank": r, "host": host, "device": "cpu: test", "memory_bytes": 8 * 2**30,
                      "compute": [[n, (a * (r + 1)) + b * n] for n in tokens], "links": links})
    return {"ranks": ranks, "tokens": tokens, "sizes": sizes, "repeats": 3, "device_type": "cpu",
            "torch": "test", "launcher": "spawn", "backend": "gloo"}


def test_build_cluster_one_host():
    c = build_cluster(synthetic(["h", "h"]), ProfileOptions(slots=3))
    assert c.num_devices == 2 and c.num_nodes == 1 and set(c.links) == {INTRA}
    assert [d.compute.a for d in c.devices] == pytest.approx([1e-3, 2e-3])
    assert [d.compute.b for d in c.devices] == pytest.approx([3e-5, 3e-5])
    assert c.links[INTRA].alpha == pytest.approx(5e-5) and c.links[INTRA].beta == pytest.approx(2e9)
    assert all(d.slots == 3 and d.memory_bytes == 4 * 2**30 for d in c.devices)  # host memory shared by 2
    assert c.provenance["source"] == "profile" and c.provenance["world_size"] == 2
    assert Cluster.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_build_cluster_two_hosts_has_inter_link_and_pair_overrides():
    meas = synthetic(["a", "a", "b"], alphas={(0, 1): 5e-5, (0, 2): 3e-4})
    c = build_cluster(meas, ProfileOptions(all_pairs=True))
    assert c.num_nodes == 2 and list(c.node_of) == [0, 0, 1]
    assert c.links[INTER].alpha == pytest.approx(3e-4) and c.links[INTRA].alpha == pytest.approx(5e-5)
    assert c.pairs[(0, 2)] == c.pairs[(2, 0)] and c.pairs[(0, 2)].alpha == pytest.approx(3e-4)
    assert set(c.provenance["pair_fits"]) == {"0-1", "0-2"}


def test_bad_options_are_input_errors():
    with pytest.raises(InputError, match="world-size"):
        profile(ProfileOptions(world_size=1))
    with pytest.raises(InputError, match="statistic"):
        profile(ProfileOptions(statistic="mean"))
    with pytest.raises(InputError, match="device"):
        profile(ProfileOptions(device="tpu"))


def test_missing_cuda_is_a_clear_error(capsys, tmp_path):
    import torch  # a dependency: never skipped for its absence
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["profile", "-o", str(tmp_path / "c.json"), "--device", "cuda"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_validation_cases_route_exactly_as_the_estimator_routes():
    """The whole-token flow the validation's steps send equals the estimator's fractional routing
    on every case (their demands are whole tokens), so measured and predicted traffic match."""
    for case in cases(num_experts=8, tokens=512):
        n = route_tokens(case.counts, case.share)  # [source, expert, device], what the workers send
        assert (n.sum(axis=2) == case.counts).all()  # every token goes somewhere
        assert (n.sum(axis=0)[~case.x] == 0).all()  # never to a device without a replica
        served = n.sum(axis=0)  # [expert, device]: each replica serves its share, rounded
        assert (served == apportion(case.counts.sum(axis=0), case.share)).all()
        local, remote = route(case.counts, case.share)  # the estimator's
        sent = n.sum(axis=1).astype(float)
        assert (np.diagonal(n, axis1=0, axis2=2) == local).all(), case.name
        np.fill_diagonal(sent, 0.0)
        assert (sent == remote).all(), case.name
    replicated = cases(num_experts=8, tokens=512)[-1]
    assert replicated.x[0].all() and 0 < replicated.share[0, 1] < 1  # the case that splits an expert


def test_profile_quick_world_size_2(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        # min: the least disturbed repeat, so other programs on these 2 cores cannot break the fit
        main(["profile", "-o", str(out), "--quick", "--world-size", "2", "--no-progress", "--timeout", "60",
              "--statistic", "min"])
    assert exc.value.code == 0
    assert time.monotonic() - t0 < 60
    c = Cluster.load(out)
    assert c.num_devices == 2 and c.num_nodes == 1
    for d in c.devices:
        assert d.compute.a >= 0 and d.compute.b > 0
        assert len(d.compute.fit["samples"]) == 3 and len(d.compute.fit["residuals"]) == 3
    assert c.links[INTRA].beta > 0
    p = c.provenance
    assert p["source"] == "profile" and p["quick"] is True and p["statistic"] == "min"
    assert p["world_size"] == 2 and p["backend"] == "gloo"
    assert p["when"].endswith("+00:00") and p["torch"] and len(p["devices"]) == 2
    assert set(p["link_fits"]) == {"intra"} and set(p["p2p_fits"]) == {"intra"}
    assert c.expert == ExpertShape(256, 1024, "fp32")
    assert "wrote" in capsys.readouterr().out
    assert [f.name for f in tmp_path.iterdir()] == ["cluster.json"]  # no temp file left behind


def test_validation_replays_each_case_through_the_real_layer_world_size_2():
    """The steps go through runtime.layer.FlexMoE: the counts its dispatch gathered are the case's,
    it used the case's shares, and each device's experts computed what the routing rule sends them."""
    from cost_models.presets import local_cpu
    from experiments.validate_estimator import table, validate

    rows = validate(local_cpu(slots=4, expert=ExpertShape(32, 64, "fp32")), num_experts=4, tokens=64, steps=2,
                    warmup=1, timeout_s=60)
    all_cases = cases(4, 64)
    assert [r["shape"] for r in rows] == [c.name for c in all_cases]
    for r, c in zip(rows, all_cases):
        assert r["measured_s"] > 0 and r["predicted_s"] > 0 and np.isfinite(r["rel_error"])
        assert set(r["phases_ms"]) == {0, 1}
        for ph in r["phases_ms"].values():  # the experts' time is inside the layer's forward and backward
            assert 0 < ph["experts fwd"] <= ph["forward"] and 0 < ph["experts bwd"] <= ph["backward"]
        seen = r["seen"]
        assert (np.array(seen["counts"]) == c.counts).all(), c.name
        assert np.array(seen["share"]) == pytest.approx(c.share), c.name
        served = route_tokens(c.counts, c.share).sum(axis=0)  # [expert, device]
        assert (np.array(seen["served"]) == served).all(), c.name
    assert "worst relative error" in table(rows)


def test_validation_refuses_a_cluster_the_runtime_cannot_train_like():
    """The runtime's experts are fp32: a bf16 profile would predict another computation."""
    from cost_models.presets import local_cpu
    from experiments.validate_estimator import validate

    with pytest.raises(InputError, match="fp32"):
        validate(local_cpu(expert=ExpertShape(32, 64, "bf16")), num_experts=4, tokens=8, steps=1, timeout_s=10)


def test_pairs_cover_every_link_class():
    from cost_models.profiler import _pairs

    assert _pairs(["a", "a", "b", "b"], False) == [(0, 1), (0, 2), (0, 3)]
    assert _pairs(["a", "b", "b"], False) == [(0, 1), (0, 2), (1, 2)]  # rank 0 alone on its host
    assert _pairs(["a", "a", "a"], True) == [(0, 1), (0, 2), (1, 2)]

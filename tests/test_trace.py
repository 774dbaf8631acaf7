import numpy as np
import pytest

from cost_models.files import InputError
from tests.file_helpers import assert_rejected
from experiments.traces import SYNTH_KINDS, imbalance_stats, import_smartmoe, synth
from planner.trace import Trace


def _trace():
    rng = np.random.default_rng(1)
    return Trace(rng.integers(0, 50, (3, 2, 4, 6)), top_k=2, step_ids=[10, 20, 30], layer_ids=[0, 7],
                 origin="test", meta={"note": "x"})


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_round_trip_is_lossless(tmp_path, suffix):
    t = _trace()
    t.save(tmp_path / f"t{suffix}")
    back = Trace.load(tmp_path / f"t{suffix}")
    assert np.array_equal(back.counts, t.counts) and back.counts.dtype == np.int64
    assert np.array_equal(back.step_ids, t.step_ids) and np.array_equal(back.layer_ids, t.layer_ids)
    assert (back.top_k, back.origin, back.meta) == (2, "test", {"note": "x"})


def _json_doc(**changes):
    t = _trace()
    doc = {"schema": "flexmoe.trace/1", "top_k": 2, "counts": t.counts.tolist(), "step_ids": [1, 2, 3],
           "layer_ids": [0, 1]}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("doc, message", [
    ('{"schema": "flexmoe.trace/1", "counts": [[[', "not valid JSON"),
    (_json_doc(schema="flexmoe.trace/0"), "unsupported schema"),
    ({"counts": [[[[1]]]]}, "missing 'schema'"),
    (_json_doc(counts=[[[1, 2]]]), "must be 4-D"),
    (_json_doc(counts=[[[[1, -3]]]], step_ids=[0], layer_ids=[0]), "non-negative"),
    (_json_doc(counts=[[[[1.5, 2]]]], step_ids=[0], layer_ids=[0]), "whole token numbers"),
    (_json_doc(counts=[[[[1, 2], [3]]]], step_ids=[0], layer_ids=[0]), "rectangular"),
    (_json_doc(step_ids=[1, 2]), "step_ids has shape (2,), expected (3,)"),
    (_json_doc(top_k=0), "top_k must be >= 1"),
])
def test_bad_json_traces(tmp_path, doc, message):
    assert_rejected(Trace.load, tmp_path / "t.json", doc, message)


def test_nan_counts_in_npz(tmp_path):
    t = _trace()
    t.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as d:
        arrays = dict(d)
    arrays["counts"] = arrays["counts"].astype(float)
    arrays["counts"][0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(InputError, match="NaN"):
        Trace.load(tmp_path / "nan.npz")
    del arrays["meta"]
    np.savez(tmp_path / "nometa.npz", **arrays)
    with pytest.raises(InputError, match="missing array 'meta'"):
        Trace.load(tmp_path / "nometa.npz")


def test_truncated_npz(tmp_path):
    _trace().save(tmp_path / "t.npz")
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.npz"):
        Trace.load(tmp_path / "cut.npz")
    with pytest.raises(InputError, match="no such trace file"):
        Trace.load(tmp_path / "absent.npz")


@pytest.mark.parametrize("kind", SYNTH_KINDS)
def test_synth_is_seeded_and_well_formed(kind):
    a = synth(kind, steps=12, layers=2, sources=4, experts=8, tokens_per_source=100, top_k=2, seed=3)
    b = synth(kind, steps=12, layers=2, sources=4, experts=8, tokens_per_source=100, top_k=2, seed=3)
    assert np.array_equal(a.counts, b.counts)
    assert a.counts.shape == (12, 2, 4, 8)
    assert (a.counts.sum(axis=3) == 200).all()  # every source routes tokens * top_k slots
    assert a.origin == f"synthetic:{kind}"


def test_synth_shapes_of_skew():
    zipf = synth("zipf", steps=20, sources=4, experts=16, alpha=1.2, seed=0).expert_loads()[:, 0]
    uniform = synth("uniform", steps=20, sources=4, experts=16, seed=0).expert_loads()[:, 0]
    assert (zipf.max(1) / zipf.mean(1)).mean() > 3 > 1.3 > (uniform.max(1) / uniform.mean(1)).mean()
    rot = synth("rotate", steps=4, sources=2, experts=8, period=1, tokens_per_source=10**6, seed=0)
    hot = rot.expert_loads()[:, 0].argmax(axis=1)
    assert [(h - hot[0]) % 8 for h in hot] == [0, 1, 2, 3]


def test_synth_bad_parameters():
    with pytest.raises(InputError, match="unknown synthetic kind"):
        synth("gauss")
    with pytest.raises(InputError, match="top_k"):
        synth("zipf", experts=2, top_k=3)
    with pytest.raises(InputError, match="steps must be >= 1"):
        synth("zipf", steps=0)


def _write_logs(root, iters=(1, 11), ranks=2, layers=3, mbs=4, experts=5, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 300, (len(iters), layers, ranks, mbs, experts))
    for i, it in enumerate(iters):
        for r in range(ranks):
            lines = [f"{l}:" + str([[float(v) for v in mb] for mb in raw[i, l, r]]) for l in range(layers)]
            (root / f"table_iter{it}_rank{r}.log").write_text("\n".join(lines) + "\n")
    return raw


def test_smartmoe_import_matches_raw_totals(tmp_path):
    raw = _write_logs(tmp_path)
    summed = import_smartmoe(tmp_path, "sum")
    assert summed.counts.shape == (2, 3, 2, 5)
    assert np.array_equal(summed.counts, raw.sum(axis=3))
    assert summed.step_ids.tolist() == [1, 11] and summed.top_k == 2
    split = import_smartmoe(tmp_path, "split")
    assert split.counts.shape == (8, 3, 2, 5)
    assert np.array_equal(split.counts[5], raw[1, :, :, 1])  # iteration 11, micro-batch 1
    assert np.array_equal(split.counts.sum(axis=0), raw.sum(axis=(0, 3)))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "table_iter11_rank1.log").unlink(), "missing logs for iter 11 rank 1"),
    (lambda d: (d / "table_iter1_rank0.log").write_text("0:[[1.0, 2.0], [3.0]\n"), "line 1"),
    (lambda d: (d / "table_iter1_rank0.log").write_text("0:[[1.0, -2.0, 0, 0, 0]]\n"), "non-negative"),
    (lambda d: (d / "table_iter1_rank0.log").write_text("garbage\n"), "expected 'LAYER:"),
    (lambda d: (d / "table_iter1_rank0.log").write_text("0:[[1.0, 2.0, 3.0, 4.0, 5.0]]\n"), "disagree"),
])
def test_smartmoe_bad_logs(tmp_path, breakage, message):
    _write_logs(tmp_path)
    breakage(tmp_path)
    with pytest.raises(InputError, match=message):
        import_smartmoe(tmp_path)


def test_smartmoe_empty_directory(tmp_path):
    with pytest.raises(InputError, match="no table_iter"):
        import_smartmoe(tmp_path)


def test_imbalance_stats_by_hand():
    # 1 step, 1 layer, 2 sources, 4 experts; loads per expert = [6, 2, 2, 2] (top-1).
    t = Trace(np.array([[[[3, 1, 1, 1], [3, 1, 1, 1]]]]))
    (row,) = imbalance_stats(t, devices=2)
    assert row["tokens_per_step"] == 12
    assert row["expert_max_over_mean"] == pytest.approx(6 / 3)
    # plain EP: device 0 holds experts 0, 1 (8 tokens), device 1 holds 2, 3 (4 tokens): 8 / 6.
    assert row["device_max_over_mean"] == pytest.approx(8 / 6)


def test_smartmoe_npz_excerpt(tmp_path):
    raw = np.random.default_rng(2).integers(0, 100, (3, 2, 4, 2, 5)).astype(np.uint16)
    np.savez(tmp_path / "ex.npz", counts=raw, iters=np.array([1, 11, 21]), layers=np.array([0, 7]))
    t = import_smartmoe(tmp_path / "ex.npz")
    assert np.array_equal(t.counts, raw.sum(axis=3)) and t.layer_ids.tolist() == [0, 7]
    assert t.step_ids.tolist() == [1, 11, 21]
    np.savez(tmp_path / "bad.npz", counts=raw.sum(axis=3))
    with pytest.raises(InputError, match="bad.npz: expected 'counts' of shape"):
        import_smartmoe(tmp_path / "bad.npz")

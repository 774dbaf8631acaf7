"""Hostile and careless input to every command and reader: each case must exit 2 with one line
`flexmoe: error: ...` naming the file (or the option), no traceback, and leave the directory
exactly as it was (nothing written, nothing replaced, no temporary file).

Classes (CLASSES below): syntax (truncated, empty, binary), nesting (deep JSON or lists), schema
(wrong family or type), constants (NaN/Infinity), huge (numbers past every sane bound), values
(negative or fractional counts, bad ids), npz (a .npy, a bad zip, pickled arrays), missing
(no such file, a directory), outputs (a directory, an input, a parent that is a file), options
(NaN, inf, negative, huge), checkpoint (missing keys, shapes, step, world size), train (inputs
only workers used to check: cluster, text length, plan), shapes (parts that do not fit together).
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from cost_models.cluster import Cluster
from cost_models.files import InputError
from cost_models.presets import local_cpu
from experiments.traces import synth
from flexmoe.cli import main
from planner.eplb_mapping import load_eplb, save_eplb
from planner.plan import Plan, static_layer
from planner.trace import Trace
from runtime.launch import spawn
from runtime.model import ModelConfig
from runtime.trainer import TrainConfig

TRAIN = ["--steps", "2", "--batch", "1", "--seq-len", "16", "--d-model", "16", "--heads", "2", "--d-ff", "16",
         "--experts", "4", "--no-progress", "--timeout", "60"]
MODEL = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, top_k=2, seq_len=16)
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Valid files every case starts from: cluster, trace (.npz and .json), plan, checkpoint, text, logs."""
    d = tmp_path_factory.mktemp("good")
    local_cpu(slots=5, world_size=2).save(d / "c.json")
    t = synth("zipf", steps=4, layers=1, sources=2, experts=8, tokens_per_source=64)
    t.save(d / "t.npz")
    t.save(d / "t.json")
    slots = np.array([5, 5])
    Plan(8, slots, [static_layer(8, slots)]).save(d / "p.json")
    (d / "d.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 60)
    spawn(TrainConfig(MODEL, steps=1, batch=1, progress=False, checkpoint=str(d / "ck.pt")), 1)
    logs = d / "logs"
    logs.mkdir()
    for r in range(2):
        (logs / f"table_iter1_rank{r}.log").write_text("0:[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]\n")
    return d


def _json(path, doc):
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))


def _edit(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _npz(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _ckpt(path, change):
    doc = torch.load(path, weights_only=True)
    change(doc)
    torch.save(doc, path)


def _npy(path):
    with open(path, "wb") as fh:
        np.save(fh, np.ones(3))


def _meta():
    return np.array(json.dumps({"schema": "flexmoe.trace/1", "top_k": 2}))


def _dir(p):
    p.unlink() if p.exists() else None
    p.mkdir()


# Commands, each reading the file named by the case.
CMD = {
    "stats": lambda d, f: ["trace", "stats", f],
    "show": lambda d, f: ["cluster", "show", f],
    "plan-c": lambda d, f: ["plan", "-c", f, "-t", d / "t.npz", "-o", d / "out.json", "--solver", "greedy"],
    "plan-t": lambda d, f: ["plan", "-c", d / "c.json", "-t", f, "-o", d / "out.json", "--solver", "greedy"],
    "plan-cur": lambda d, f: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "out.json", "--solver",
                              "greedy", "--current", f],
    "compare-c": lambda d, f: ["compare", "-c", f, "-t", d / "t.npz", "-o", d / "rep", "--policies", "static",
                               "--no-figures"],
    "compare-t": lambda d, f: ["compare", "-c", d / "c.json", "-t", f, "-o", d / "rep", "--policies", "static",
                               "--no-figures"],
    "train-c": lambda d, f: ["train", "--cluster", f, *TRAIN],
    "train-plan": lambda d, f: ["train", "--plan", f, *TRAIN],
    "train-resume": lambda d, f: ["train", "--world-size", "1", "--resume", f, *TRAIN],
    "train-data": lambda d, f: ["train", "--data", f, *TRAIN],
    "import": lambda d, f: ["trace", "import-smartmoe", f, "-o", d / "out.npz"],
}
JSON_READERS = [("c.json", ["show", "plan-c", "compare-c", "train-c"]), ("p.json", ["plan-cur", "train-plan"]),
                ("t.json", ["stats", "plan-t", "compare-t"])]


# Long only as a table: one row per hostile file, grouped by the file it breaks; no logic to split.
def _cases():
    """(id, class, file name, mutation(dir, path), commands, expected words or None)."""
    out = []
    for name, cmds in JSON_READERS:
        out += [
            (f"{name}-empty", "syntax", name, lambda d, p: _json(p, ""), cmds, "not valid JSON"),
            (f"{name}-truncated", "syntax", name, lambda d, p: _json(p, p.read_text()[:40]), cmds, "not valid JSON"),
            (f"{name}-binary", "syntax", name, lambda d, p: p.write_bytes(b"\x89PNG\xff\xfe\x00"), cmds, None),
            (f"{name}-deep", "nesting", name, lambda d, p: _json(p, DEEP), cmds, "nested too deeply"),
            (f"{name}-list", "schema", name, lambda d, p: _json(p, [1, 2]), cmds, "JSON object"),
            (f"{name}-schema", "schema", name, lambda d, p: _edit(p, lambda x: x.update(schema="flexmoe.x/9")), cmds,
             "unsupported schema"),
            (f"{name}-nan", "constants", name, lambda d, p: _json(p, re.sub(r'(": )-?[0-9.]+', r"\1NaN", p.read_text(),
                                                                            count=1)), cmds, "NaN"),
            (f"{name}-infinity", "constants", name,
             lambda d, p: _json(p, re.sub(r'(": )-?[0-9.]+', r"\1-Infinity", p.read_text(), count=1)), cmds,
             "Infinity"),
            (f"{name}-missing", "missing", name, lambda d, p: p.unlink(), cmds, "no such"),
            (f"{name}-dir", "missing", name, lambda d, p: _dir(p), cmds, "directory"),
        ]
    c, t, pj = ["show", "plan-c", "compare-c", "train-c"], ["stats", "plan-t", "compare-t"], ["plan-cur", "train-plan"]

    def dev(key, value):
        return lambda d, p: _edit(p, lambda x: x["devices"][0].update({key: value}))

    def comp(key, value):
        return lambda d, p: _edit(p, lambda x: x["devices"][0]["compute"].update({key: value}))
    out += [
        ("slots-2**63", "huge", "c.json", dev("slots", 2**63), c, "slots must be <="),
        ("compute-1e308", "huge", "c.json", comp("a", 1e308), c, "compute.a must be <="),
        ("b-1e308", "huge", "c.json", comp("b", 1e308), c, "compute.b must be <="),
        ("beta-tiny", "huge", "c.json", lambda d, p: _edit(p, lambda x: x["links"]["intra"].update(beta=1e-300)),
         c, "beta must be >="),
        ("int-10**400", "huge", "c.json", lambda d, p: _json(p, p.read_text().replace('"slots": 5', '"slots": '
                                                                                     + "9" * 400, 1)), c, None),
        ("memory-negative", "values", "c.json", dev("memory_bytes", -1), c, "memory_bytes must be >= 0"),
        ("ids-unordered", "values", "c.json", dev("id", 7), c, "device ids"),
        ("devices-dict", "schema", "c.json", lambda d, p: _edit(p, lambda x: x.update(devices={"a": 1})), c, None),
        ("pairs-string", "schema", "c.json", lambda d, p: _edit(p, lambda x: x.update(pairs="x")), c, None),
        ("no-expert", "schema", "c.json", lambda d, p: _edit(p, lambda x: x.pop("expert")), c, "missing"),
        ("counts-2**63", "huge", "t.json", lambda d, p: _edit(p, lambda x: x["counts"][0][0][0].__setitem__(0, 2**63)),
         t, "at most"),
        ("counts-10**400", "huge", "t.json",
         lambda d, p: _edit(p, lambda x: x["counts"][0][0][0].__setitem__(0, 10**400)), t, "finite numbers"),
        ("counts-negative", "values", "t.json",
         lambda d, p: _edit(p, lambda x: x["counts"][0][0][0].__setitem__(0, -3)), t, "non-negative"),
        ("counts-fraction", "values", "t.json",
         lambda d, p: _edit(p, lambda x: x["counts"][0][0][0].__setitem__(0, 0.5)), t, "whole"),
        ("counts-3d", "shapes", "t.json", lambda d, p: _edit(p, lambda x: x.update(counts=x["counts"][0])), t, "4-D"),
        ("counts-ragged", "shapes", "t.json",
         lambda d, p: _edit(p, lambda x: x["counts"][0][0].__setitem__(0, [1])), t, "rectangular"),
        ("step-ids-huge", "huge", "t.json", lambda d, p: _edit(p, lambda x: x["step_ids"].__setitem__(0, 2**70)), t,
         "step_ids"),
        ("top-k-zero", "values", "t.json", lambda d, p: _edit(p, lambda x: x.update(top_k=0)), t, "top_k"),
        ("npz-npy", "npz", "t.npz", lambda d, p: _npy(p), t, ".npy"),
        ("npz-zip-garbage", "npz", "t.npz", lambda d, p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 40), t, None),
        ("npz-truncated", "syntax", "t.npz", lambda d, p: p.write_bytes(p.read_bytes()[:60]), t, None),
        ("npz-pickled", "npz", "t.npz",
         lambda d, p: _npz(p, counts=np.array([object()] * 2, dtype=object), meta=_meta()), t, None),
        ("npz-meta-deep", "nesting", "t.npz",
         lambda d, p: _npz(p, counts=np.ones((1, 1, 2, 8), dtype=np.int64), meta=np.array(DEEP)), t,
         "nested too deeply"),
        ("npz-uint64-giant", "huge", "t.npz",
         lambda d, p: _npz(p, counts=np.full((1, 1, 2, 8), 2**63, dtype=np.uint64), meta=_meta()), t, "at most"),
        ("npz-inf", "constants", "t.npz",
         lambda d, p: _npz(p, counts=np.full((1, 1, 2, 8), np.inf), meta=_meta()), t, "NaN or infinite"),
        ("npz-no-meta", "schema", "t.npz", lambda d, p: _npz(p, counts=np.ones((1, 1, 2, 8))), t, "missing"),
        ("npz-missing", "missing", "t.npz", lambda d, p: p.unlink(), t, "no such"),
        ("npz-dir", "missing", "t.npz", lambda d, p: _dir(p), t, "directory"),
        ("plan-owner-2**63", "huge", "p.json",
         lambda d, p: _edit(p, lambda x: x["layers"][0]["owner"].__setitem__(0, 2**63)), pj, "at most 2**53"),
        ("plan-shares-nan", "values", "p.json",
         lambda d, p: _json(p, p.read_text().replace("1.0", "-1.0", 1)), pj, None),
        ("plan-experts-huge", "huge", "p.json", lambda d, p: _edit(p, lambda x: x.update(num_experts=2**62)), pj,
         "num_experts"),
        ("plan-slots-mismatch", "shapes", "p.json", lambda d, p: _edit(p, lambda x: x.update(num_devices=3)), pj,
         None),
        ("logs-deep", "nesting", "logs",
         lambda d, p: (p / "table_iter1_rank0.log").write_text("0:" + "[" * 100_000 + "]" * 100_000 + "\n"),
         ["import"], "line 1"),
        ("logs-huge", "huge", "logs",
         lambda d, p: (p / "table_iter1_rank0.log").write_text("0:[[1e300, 2.0, 3.0], [1, 2, 3]]\n"), ["import"],
         "at most"),
        ("logs-binary", "syntax", "logs", lambda d, p: (p / "table_iter1_rank0.log").write_bytes(b"\xff\xfe\x00"),
         ["import"], None),
    ]
    # Checkpoints (read by train --resume; world size 1, as written).
    r = ["train-resume"]
    out += [
        ("ck-missing-key", "checkpoint", "ck.pt", lambda d, p: _ckpt(p, lambda x: x.pop("dense_opt")), r, "lacks"),
        ("ck-experts-shape", "checkpoint", "ck.pt",
         lambda d, p: _ckpt(p, lambda x: x.update(experts=x["experts"][:, :, :2])), r, "shape"),
        ("ck-dense-shape", "checkpoint", "ck.pt",
         lambda d, p: _ckpt(p, lambda x: x["dense"].update({"tok.weight": torch.zeros(3, 3)})), r, "wrong shape"),
        ("ck-negative-step", "checkpoint", "ck.pt", lambda d, p: _ckpt(p, lambda x: x.update(step=-4)), r, "step"),
        ("ck-nan-experts", "checkpoint", "ck.pt",
         lambda d, p: _ckpt(p, lambda x: x["experts"].fill_(float("nan"))), r, "NaN"),
        ("ck-replan-shape", "checkpoint", "ck.pt",
         lambda d, p: _ckpt(p, lambda x: x.update(replan={"smoothed": torch.zeros(2), "last_trigger": 0, "seq": 0})),
         r, "monitor counts"),
        ("ck-garbage", "checkpoint", "ck.pt", lambda d, p: p.write_bytes(b"not a zip at all"), r, "not a readable"),
        ("ck-json", "checkpoint", "ck.pt", lambda d, p: torch.save({"format": "x"}, p), r, "not a flexmoe"),
        ("ck-missing", "missing", "ck.pt", lambda d, p: p.unlink(), r, "no such"),
    ]
    # Inputs the workers used to be the first to read.
    out += [
        ("train-empty-cluster", "train", "c.json", lambda d, p: _json(p, ""), ["train-c"], "not valid JSON"),
        ("train-cluster-size", "train", "c.json",
         lambda d, p: local_cpu(slots=5, world_size=3).save(p), ["train-c"], "3 devices"),
        ("train-short-text", "train", "d.txt", lambda d, p: p.write_text("x" * 1024), ["train-data-long"],
         "shorter than a sequence"),
        ("train-tiny-text", "train", "d.txt", lambda d, p: p.write_text("x"), ["train-data"], "bytes"),
        ("train-plan-world", "train", "p.json", lambda d, p: None, ["train-plan"], "training has"),
        ("train-ck-world", "checkpoint", "ck.pt", lambda d, p: None, ["train-resume-2"], "--world-size 1"),
    ]
    return out


CMD["train-resume-2"] = lambda d, f: ["train", "--resume", f, *TRAIN]
CMD["train-data-long"] = lambda d, f: ["train", "--data", f, *TRAIN, "--seq-len", "2000"]

# Outputs and option values: (id, class, argv builder, name expected in the message).
OUT_CASES = [
    ("plan-out-dir", "outputs", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "logs"], "logs"),
    ("plan-out-is-input", "outputs", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "t.npz"],
     "t.npz"),
    ("plan-eplb-dir", "outputs", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "o.json",
                                            "--eplb-out", d / "logs"], "logs"),
    ("plan-eplb-same", "outputs", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "o.json",
                                             "--eplb-out", d / "o.json"], "o.json"),
    ("plan-parent-file", "outputs", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o",
                                               d / "d.txt" / "o.json"], "d.txt"),
    ("compare-out-file", "outputs", lambda d: ["compare", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "d.txt"],
     "d.txt"),
    ("compare-out-is-input", "outputs", lambda d: ["compare", "-c", d / "c.json", "-t", d / "t.npz", "-o",
                                                   d / "t.npz"], "t.npz"),
    ("train-ck-dir", "outputs", lambda d: ["train", "--checkpoint", d / "logs", *TRAIN], "logs"),
    ("train-trace-is-data", "outputs", lambda d: ["train", "--data", d / "d.txt", "--trace-out", d / "d.txt", *TRAIN],
     "d.txt"),
    ("train-trace-is-resume", "outputs", lambda d: ["train", "--world-size", "1", "--resume", d / "ck.pt",
                                                    "--trace-out", d / "ck.pt", *TRAIN], "ck.pt"),
    ("train-ck-is-cluster", "outputs", lambda d: ["train", "--cluster", d / "c.json", "--checkpoint", d / "c.json",
                                                  *TRAIN], "c.json"),
    ("synth-out-dir", "outputs", lambda d: ["trace", "synth", "zipf", "-o", d / "logs"], "logs"),
    ("preset-out-dir", "outputs", lambda d: ["cluster", "preset", "local-cpu", "-o", d / "logs"], "logs"),
    ("profile-out-dir", "outputs", lambda d: ["profile", "-o", d / "logs"], "logs"),
    ("import-out-is-log", "outputs", lambda d: ["trace", "import-smartmoe", d / "logs", "-o",
                                                d / "logs" / "table_iter1_rank0.log"], "logs"),
    ("train-time-budget-nan", "options", lambda d: ["train", "--time-budget", "nan", *TRAIN], "--time-budget"),
    ("train-aux-nan", "options", lambda d: ["train", "--aux-coef", "nan", *TRAIN], "aux_coef"),
    ("train-lr-inf", "options", lambda d: ["train", "--lr", "inf", *TRAIN], "--lr"),
    ("train-steps-huge", "options", lambda d: ["train", *TRAIN, "--steps", str(2**70)], "--steps"),
    ("train-threshold-nan", "options", lambda d: ["train", "--threshold", "nan", *TRAIN], "--threshold"),
    ("train-world-huge", "options", lambda d: ["train", "--world-size", str(2**63), *TRAIN], "--world-size"),
    ("train-timeout-nan", "options", lambda d: ["train", *TRAIN, "--timeout", "nan"], "--timeout"),
    ("plan-budget-nan", "options", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "o.json",
                                              "--time-budget", "nan"], "--time-budget"),
    ("plan-ema-nan", "options", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "o.json",
                                           "--ema", "nan"], "--ema"),
    ("plan-slots-huge", "options", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "o.json",
                                              "--slots", str(2**63)], "--slots"),
    ("plan-too-few-slots", "options", lambda d: ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "o.json",
                                                 "--slots", "2"], "--slots 5"),
    ("compare-budget-inf", "options", lambda d: ["compare", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "rep",
                                                 "--time-budget", "inf"], "--time-budget"),
    ("compare-trigger-nan", "options", lambda d: ["compare", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "rep",
                                                  "--trigger", "nan"], "--trigger"),
    ("compare-capacity-nan", "options", lambda d: ["compare", "-c", d / "c.json", "-t", d / "t.npz", "-o",
                                                   d / "rep", "--capacity-factor", "nan"], "--capacity-factor"),
    ("synth-alpha-nan", "options", lambda d: ["trace", "synth", "zipf", "-o", d / "z.npz", "--alpha", "nan"],
     "--alpha"),
    ("synth-steps-huge", "options", lambda d: ["trace", "synth", "zipf", "-o", d / "z.npz", "--steps", "60000",
                                               "--experts", "60000"], "steps x layers"),
    ("preset-slots-huge", "options", lambda d: ["cluster", "preset", "local-cpu", "-o", d / "x.json", "--slots",
                                                str(2**63)], "--slots"),
    ("preset-dtype", "options", lambda d: ["cluster", "preset", "local-cpu", "-o", d / "x.json", "--dtype", "fp7"],
     "--dtype"),
    ("profile-timeout-nan", "options", lambda d: ["profile", "-o", d / "x.json", "--timeout", "nan"], "--timeout"),
    ("stats-devices-negative", "options", lambda d: ["trace", "stats", d / "t.npz", "--devices", "-1"], "--devices"),
    ("unknown-option", "options", lambda d: ["plan", "--frobnicate", "1"], "--frobnicate"),
]

# Every mutation through its first command; through the others only those that reach another code
# path there (each command reads with the same reader, so the rest would repeat the first).
EVERY_COMMAND = ("empty", "deep", "missing", "dir", "binary")
CASES = [(f"{cid}@{cmd}", cls, name, mutate, cmd, words)
         for cid, cls, name, mutate, cmds, words in _cases()
         for cmd in (cmds if cid.endswith(EVERY_COMMAND) or cls in ("huge", "train") else cmds[:2])]
CLASSES = sorted({c[1] for c in CASES} | {c[1] for c in OUT_CASES})


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def _run(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def _check(capsys, d, argv, words, name):
    before = _snapshot(d)
    code, out, err = _run(capsys, argv)
    assert code == 2, (code, out, err)
    assert err.startswith("flexmoe: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out
    assert name in err, err
    if words:
        assert words in err, err
    assert _snapshot(d) == before  # nothing written, replaced or left behind


@pytest.mark.parametrize("cid, cls, name, mutate, cmd, words", CASES, ids=[c[0] for c in CASES])
def test_bad_file(good, tmp_path, capsys, cid, cls, name, mutate, cmd, words):
    d = tmp_path / "w"
    shutil.copytree(good, d)
    mutate(d, d / name)
    _check(capsys, d, CMD[cmd](d, d / name), words, name)


@pytest.mark.parametrize("cid, cls, argv, name", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_bad_output_or_option(good, tmp_path, capsys, cid, cls, argv, name):
    d = tmp_path / "w"
    shutil.copytree(good, d)
    _check(capsys, d, argv(d), None, name)


def test_suite_covers_every_class():
    assert set(CLASSES) >= {"syntax", "nesting", "schema", "constants", "huge", "values", "npz", "missing",
                            "outputs", "options", "checkpoint", "train", "shapes"}
    assert len(CASES) + len(OUT_CASES) >= 150


# --- readers under random input (hypothesis): an InputError naming the file, or a valid object ----
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=4), max_leaves=20)


def _reader_accepts_or_names(load, path):
    try:
        load(path)
    except InputError as exc:
        assert str(path) in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values, which=st.sampled_from(["cluster", "plan", "trace"]))
def test_readers_on_random_json(tmp_path, doc, which):
    path = tmp_path / "x.json"
    schema = {"cluster": "flexmoe.cluster/1", "plan": "flexmoe.plan/1", "trace": "flexmoe.trace/1"}[which]
    if isinstance(doc, dict):
        doc = dict(doc, schema=schema)
    path.write_text(json.dumps(doc))
    _reader_accepts_or_names({"cluster": Cluster.load, "plan": Plan.load, "trace": Trace.load}[which], path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), which=st.sampled_from(["cluster", "plan", "trace-npz", "trace-json", "eplb"]))
def test_readers_on_random_bytes(tmp_path, data, which):
    path = tmp_path / ("x.npz" if which in ("trace-npz", "eplb") else "x.json")
    path.write_bytes(data)
    load = {"cluster": Cluster.load, "plan": Plan.load, "trace-npz": Trace.load, "trace-json": Trace.load,
            "eplb": lambda p: load_eplb(p, 2)}[which]
    _reader_accepts_or_names(load, path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=st.dictionaries(st.sampled_from(["counts", "meta", "step_ids", "layer_ids", "phy2log", "logcnt",
                                               "log2phy", "phy_share", "owner"]),
                              st.sampled_from([np.ones((1, 1, 2, 3)), np.full((2, 4), -1), np.array("x"),
                                               np.array(json.dumps({"schema": "flexmoe.trace/1"})),
                                               np.full(3, 2**62, dtype=np.int64), np.full((1, 1, 1, 1), np.nan),
                                               np.zeros((0, 2)), np.arange(4.0) / 3]), max_size=5),
       which=st.sampled_from(["trace", "eplb"]))
def test_npz_readers_on_random_arrays(tmp_path, arrays, which):
    path = tmp_path / "x.npz"
    _npz(path, **arrays)
    _reader_accepts_or_names(Trace.load if which == "trace" else lambda p: load_eplb(p, 2), path)


# --- writes: all or nothing ----------------------------------------------------------------------
def test_plan_and_eplb_mapping_are_written_together(good, tmp_path, capsys, monkeypatch):
    from flexmoe.commands import plan as plan_cmd

    d = tmp_path / "w"
    shutil.copytree(good, d)
    (d / "o.json").write_text("old plan")

    def boom(plan, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_cmd, "save_eplb", boom)
    before = _snapshot(d)
    code, out, err = _run(capsys, ["plan", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "o.json",
                                   "--solver", "greedy", "--eplb-out", d / "e.npz"])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "No space left" in err, err
    assert _snapshot(d) == before  # plan.json not replaced, no mapping, no temporary


def test_a_failed_rename_puts_back_what_was_there(tmp_path, monkeypatch):
    import os

    from cost_models import files

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == b:
            raise OSError(30, "Read-only file system")
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(files.WriteError, match="b.txt: cannot write: Read-only"):
        with files.atomic_paths(a, b) as (ta, tb):
            ta.write_text("new a")
            tb.write_text("new b")
    assert a.read_text() == "old a" and not b.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_compare_report_is_written_whole_or_not_at_all(good, tmp_path, capsys, monkeypatch):
    from cost_models import files

    d = tmp_path / "w"
    shutil.copytree(good, d)
    real, calls = files.os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the third file of the report fails
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    code, out, err = _run(capsys, ["compare", "-c", d / "c.json", "-t", d / "t.npz", "-o", d / "rep",
                                   "--policies", "static,eplb", "--no-figures"])
    assert code == 1 and "No space left" in err and len(err.strip().splitlines()) == 1
    assert not (d / "rep").exists()


def test_eplb_mapping_round_trip_still_reads(tmp_path):
    slots = np.array([5, 5])
    plan = Plan(8, slots, [static_layer(8, slots)])
    save_eplb(plan, tmp_path / "e.npz")
    assert load_eplb(tmp_path / "e.npz", 2).num_experts == 8


# --- worker failures ------------------------------------------------------------------------------
def _fail_in_workers(rank):
    import time

    if rank == 1:
        raise InputError("shorter than a sequence", "text.txt")
    time.sleep(1.0)
    raise RuntimeError("Connection closed by peer")  # the echo of rank 1's failure


def test_worker_failure_reaches_the_parent_as_its_first_cause():
    from cost_models.launch import spawn_local

    with pytest.raises(InputError) as err:
        spawn_local(_fail_in_workers, (), 2, 60, "test")
    assert str(err.value) == "text.txt: shorter than a sequence"


def test_other_worker_failures_are_one_line(tmp_path):
    from cost_models.launch import WorkerError, _raise_first_failure

    for rank, (t, msg) in enumerate([(2.0, "Connection reset"), (1.0, "CUDA out of memory.\n  more detail")]):
        (tmp_path / f"{rank}.json").write_text(json.dumps(
            {"rank": rank, "time": t, "type": "RuntimeError", "message": " ".join(msg.split()), "path": None,
             "problem": None, "traceback": "Traceback ..."}))
    with pytest.raises(WorkerError) as err:
        _raise_first_failure(tmp_path, RuntimeError("process 1 terminated"), "training")
    assert str(err.value) == "training worker 1 failed: RuntimeError: CUDA out of memory. more detail"

"""The `flexmoe trace` and `flexmoe cluster` commands, and bad input at the command line."""

import json

import numpy as np
import pytest

from flexmoe.cli import main
from planner.trace import Trace


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def test_synth_then_stats(tmp_path, capsys):
    out = tmp_path / "z.npz"
    code, text, _ = run(capsys, "trace", "synth", "zipf", "-o", str(out), "--steps", "5", "--sources", "4",
                        "--experts", "8", "--tokens-per-source", "64", "--layers", "2")
    assert code == 0 and out.exists() and Trace.load(out).counts.shape == (5, 2, 4, 8)
    code, text, _ = run(capsys, "trace", "stats", str(out), "--devices", "2")
    assert code == 0 and "expert max/mean" in text and len(text.strip().splitlines()) == 4


def test_import_smartmoe_cli(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    for r in range(2):
        (logs / f"table_iter1_rank{r}.log").write_text("0:[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]\n")
    code, text, _ = run(capsys, "trace", "import-smartmoe", str(logs), "-o", str(tmp_path / "t.json"))
    assert code == 0
    t = Trace.load(tmp_path / "t.json")
    assert t.counts.tolist() == [[[[5, 7, 9], [5, 7, 9]]]]


def test_cluster_preset_and_show(tmp_path, capsys):
    out = tmp_path / "c.json"
    code, _, _ = run(capsys, "cluster", "preset", "dgx-a100-2x8", "--slots", "3", "-o", str(out))
    assert code == 0 and json.loads(out.read_text())["devices"][0]["slots"] == 3
    code, text, _ = run(capsys, "cluster", "show", str(out))
    assert code == 0 and "16 devices on 2 nodes" in text


@pytest.mark.parametrize("argv, message", [
    (["trace", "stats", "{tmp}/missing.npz"], "missing.npz: no such trace file"),
    (["trace", "stats", "{tmp}/bad.json"], "bad.json: not valid JSON"),
    (["trace", "synth", "gauss", "-o", "{tmp}/out.npz"], "'gauss' is not one of"),
    (["trace", "import-smartmoe", "{tmp}", "-o", "{tmp}/out.npz"], "no table_iter"),
    (["cluster", "show", "{tmp}/bad.json"], "bad.json: not valid JSON"),
    (["cluster", "preset", "tpu-pod", "-o", "{tmp}/out.npz"], "'tpu-pod' is not one of"),
    (["cluster", "preset", "local-cpu", "--slots", "0", "-o", "{tmp}/out.npz"], "--slots must be >= 1"),
])
def test_bad_input_exits_2_with_one_message_and_no_output(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text('{"schema": "flexmoe.trace/1", "counts": [[')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("flexmoe: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no stray temporary files


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    from planner import trace as trace_module

    out = tmp_path / "t.npz"
    Trace(np.ones((1, 1, 1, 2), dtype=int)).save(out)
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trace_module.np, "savez_compressed", boom)
    with pytest.raises(OSError):
        Trace(np.zeros((1, 1, 1, 2), dtype=int)).save(out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    Trace(np.ones((1, 1, 1, 2), dtype=int)).save(tmp_path / "t.npz")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "t.npz").stat().st_mode & 0o777 == 0o666 & ~mask

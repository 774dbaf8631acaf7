"""What the command prints: --version, --quiet, the one summary line, enums, presets' dtype."""

import json
import os
import time

import pytest

from cost_models.files import remove_stale_temps
from flexmoe import __version__
from flexmoe.cli import main
from planner.solvers import SOLVERS


def run(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def test_version(capsys):
    assert run(capsys, "--version") == (0, f"flexmoe {__version__}\n", "")


def test_quiet_keeps_only_the_summary_line_wherever_it_is_written(tmp_path, capsys):
    t = tmp_path / "t.npz"
    code, out, err = run(capsys, "trace", "synth", "zipf", "-o", t, "--steps", 2, "-q")
    assert code == 0 and out.startswith("wrote") and len(out.splitlines()) == 1 and err == ""
    code, out, _ = run(capsys, "trace", "stats", t)
    assert code == 0 and len(out.splitlines()) == 3  # summary, header, one layer
    code, out, _ = run(capsys, "--quiet", "trace", "stats", t)
    assert code == 0 and len(out.splitlines()) == 1


def test_help_shows_choices_and_the_balance_definition(capsys):
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0 and "|".join(SOLVERS) in out.replace(" ", "") and "balancedness" in " ".join(out.split())


def test_preset_dtype_applies_without_hidden_and_ffn(tmp_path, capsys):
    out = tmp_path / "c.json"
    code, text, _ = run(capsys, "cluster", "preset", "dgx-a100-2x8", "--dtype", "fp32", "-o", out)
    assert code == 0 and json.loads(out.read_text())["expert"] == {"hidden": 1024, "ffn": 4096, "dtype": "fp32"}
    code, text, _ = run(capsys, "cluster", "show", out)
    assert code == 0 and "fp32" in text


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    ck = tmp_path / "ck.pt"
    since = time.time()
    (tmp_path / ".ck.pt.abc123.tmp.pt").write_bytes(b"half")
    old = tmp_path / ".ck.pt.old999.tmp.pt"
    old.write_bytes(b"from another day")
    os.utime(old, (since - 3600, since - 3600))
    (tmp_path / "other.txt").write_text("keep")
    remove_stale_temps(ck, since)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.pt.old999.tmp.pt", "other.txt"]

"""The README's workflow runs as written on a fresh directory (what a new user types first).

Each `flexmoe` line of the block under "## Workflow" runs in order, in-process, in an empty
directory; the only changes are quicker values of options the README itself shows, appended so
they take precedence (the last value of an option wins)."""

import re
import shlex
from pathlib import Path

import pytest

from flexmoe.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
QUICKER = {"profile": ["--quick"], "trace synth": ["--steps", "10"], "plan": ["--time-budget", "0.2"],
           "train": ["--steps", "8"], "compare": ["--steps", "8", "--time-budget", "0.2"]}


def workflow() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"## Workflow\s+```\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("flexmoe ")]


def test_readme_shows_every_quicker_option():
    text = README.read_text()
    for opts in QUICKER.values():
        for o in opts[::2] if opts[0] != "--quick" else opts:
            assert f"`{o}" in text or f" {o} " in text or f"{o}`" in text, o


def test_readme_workflow_runs_verbatim(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    lines = workflow()
    assert [l[1] for l in lines] == ["profile", "trace", "plan", "train", "compare"]
    for argv in lines:
        key = " ".join(argv[1:3]) if argv[1] == "trace" else argv[1]
        with pytest.raises(SystemExit) as info:
            main(argv[1:] + QUICKER.get(key, []))
        out = capfd.readouterr()
        assert info.value.code == 0, (argv, out.err[-2000:])
        assert out.out.strip().splitlines()[-1].startswith(("wrote", "trained")), out.out
    for f in ("cluster.json", "trace.npz", "plan.json", "seen.npz", "report/report.md", "report/speedup.png"):
        assert (tmp_path / f).is_file(), f

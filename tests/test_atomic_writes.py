"""Every file the project writes goes through a temporary beside it and a rename: a write that
fails part-way leaves the old file whole and no temporary behind (cost_models/files.py)."""

import json
import pathlib

import pytest

from cost_models.files import write_json_atomic, write_text_atomic


def _fail_half_way(monkeypatch):
    real = pathlib.Path.write_text

    def half(self, data, *args, **kwargs):
        real(self, data[:len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_text", half)


@pytest.mark.parametrize("write, value", [(write_text_atomic, "new text " * 100), (write_json_atomic, {"a": [1] * 100})])
def test_a_write_failing_half_way_leaves_the_old_file_whole(tmp_path, monkeypatch, write, value):
    target = tmp_path / "out.json"
    target.write_text('{"old": true}\n')
    _fail_half_way(monkeypatch)
    with pytest.raises(OSError):
        write(target, value)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_write_failing_half_way_creates_no_file(tmp_path, monkeypatch):
    _fail_half_way(monkeypatch)
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "new.txt", "text " * 100)
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())

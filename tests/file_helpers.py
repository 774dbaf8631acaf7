"""The check every bad-file test makes: the reader refuses, naming the file and the problem."""

import json

import pytest

from cost_models.files import InputError


def assert_rejected(load, path, doc, message: str) -> None:
    """Write `doc` (text, or an object as JSON) to `path`; `load(path)` must raise an InputError
    whose message holds `message` and the path."""
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(InputError) as err:
        load(path)
    assert message in str(err.value) and str(path) in str(err.value)

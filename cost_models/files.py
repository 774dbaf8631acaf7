"""Errors that name the bad file, and atomic writes: shared by every reader and writer.

It sits in `cost_models` because that is the bottom of the import graph (`cost_models <- planner
<- runtime`), so every package can use it without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


class InputError(ValueError):
    """Bad user input. The message names the file (when there is one) and the problem.

    The CLI turns it into one line on stderr and exit status 2.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash or an exception leaves the old file (or no file) in place, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file, turning every way it can fail into an InputError naming the file."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InputError(f"no such {what} file", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} file: {exc}", path) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise InputError(f"not valid JSON ({what} file): {exc}", path) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def check_schema(doc: Any, expected: str, path: str | os.PathLike | None, what: str) -> dict:
    """Check the `schema` field of a document: the family must match and the version be known."""
    if not isinstance(doc, dict):
        raise InputError(f"a {what} file must hold a JSON object", path)
    schema = doc.get("schema")
    if schema is None:
        raise InputError(f"missing 'schema' field (expected {expected!r})", path)
    if schema != expected:
        raise InputError(f"unsupported schema {schema!r} (expected {expected!r})", path)
    return doc


def finite_number(value: Any, field: str, path: str | os.PathLike | None, *, minimum: float | None = None,
                  positive: bool = False) -> float:
    """A real, finite number, optionally bounded below: the check every numeric field needs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{field} must be a number, got {value!r}", path)
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{field} must be finite, got {value!r}", path)
    if positive and value <= 0:
        raise InputError(f"{field} must be positive, got {value!r}", path)
    if minimum is not None and value < minimum:
        raise InputError(f"{field} must be >= {minimum}, got {value!r}", path)
    return value


def whole_number(value: Any, field: str, path: str | os.PathLike | None, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field} must be an integer, got {value!r}", path)
    if value < minimum:
        raise InputError(f"{field} must be >= {minimum}, got {value!r}", path)
    return value

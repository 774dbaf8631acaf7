"""Errors that name the bad file, atomic writes, and the checks every reader and writer shares.

It sits in `cost_models` because that is the bottom of the import graph (`cost_models <- planner
<- runtime`), so every package can use it without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

# Sane upper bounds. Whole numbers beyond MAX_WHOLE overflow int64 sums; a token count beyond
# MAX_COUNT is not a real step's routing (and 2**20 entries of it still sum inside int64).
MAX_WHOLE = 2**53
MAX_COUNT = 2**40


class InputError(ValueError):
    """Bad user input. The message names the file (when there is one) and the problem.

    The CLI turns it into one line on stderr and exit status 2.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class WriteError(OSError):
    """An output could not be written (read-only, full disk, ...): the environment's fault, not the
    input's. The CLI prints one line naming the file, exit status 1."""

    def __init__(self, path: str | os.PathLike, exc: OSError):
        super().__init__(exc.errno, f"cannot write: {exc.strerror or exc}", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


# --- atomic writes ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of `paths`; when the block succeeds, each is fsynced and
    renamed onto its path, all or none: if one rename fails, the ones already made are undone.

    An exception (or a failed write) leaves every old file (or no file) in place and no temporary
    file behind. A process killed mid-write can leave a temporary `.NAME.*.tmp*`; see
    `remove_stale_temps`.
    """
    targets = [Path(p) for p in paths]
    made: list[Path] = []  # temporaries and backups, removed at the end whatever happens
    created_dirs: list[Path] = []
    try:
        tmps = []
        for path in targets:
            created_dirs += _make_parents(path)
            tmps.append(_mkstemp(path))
            made.append(tmps[-1])
        yield tmps
        for tmp in tmps:
            _fsync_file(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual mode
        done: list[tuple[Path, Path | None]] = []
        try:
            for tmp, path in zip(tmps, targets):
                backup = None
                if len(targets) > 1 and path.exists():
                    backup = _mkstemp(path, ".bak")
                    made.append(backup)
                    os.replace(path, backup)
                done.append((path, backup))
                os.replace(tmp, path)
        except OSError as exc:
            failed = path
            for path, backup in reversed(done):  # put back what was there
                if backup is not None:
                    os.replace(backup, path)
                elif path.exists():
                    path.unlink()
            raise WriteError(failed, exc) from None
        for d in {p.parent for p in targets}:
            _fsync_dir(d)
    except OSError as exc:
        if isinstance(exc, WriteError):
            raise
        named = dict(zip(map(str, made), map(str, targets)))
        raise WriteError(named.get(str(exc.filename), targets[0]), exc) from None
    finally:
        for p in made:
            with contextlib.suppress(OSError):
                p.unlink()
        for d in reversed(created_dirs):  # only directories this call made, and only if empty
            with contextlib.suppress(OSError):
                d.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """`atomic_paths` for one file."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def _mkstemp(path: Path, kind: str = ".tmp") -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=kind + path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _make_parents(path: Path) -> list[Path]:
    missing = [p for p in reversed(path.parents) if not p.exists()]
    for p in missing:
        p.mkdir()
    return missing


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(path: str | os.PathLike, since: float) -> None:
    """Remove the temporaries `atomic_paths` left beside `path` when its process was killed
    mid-write (modified at or after `since`, a `time.time()`): called by the parent that saw it die."""
    path = Path(path)
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f".{path.name}.*.tmp{path.suffix}"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime >= since - 1:
                    p.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


# --- checking outputs before any work starts -------------------------------------------------------
def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None] = (),
                  directories: Iterable[str] = ()) -> None:
    """Before any work: each output (option name -> path; None is skipped) must be writable, not
    an existing directory (or, for the options in `directories`, not an existing file), and differ
    from every input and from the other outputs. Raises InputError naming the path."""
    dirs = set(directories)
    ins = {_key(p): p for p in inputs if p is not None}
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        p = Path(path)
        key = _key(p)
        if key in ins:
            raise InputError(f"{option} would overwrite an input file", path)
        inside = [q for k, q in ins.items() if Path(q).is_dir() and k in key.parents]
        if inside and p.exists():
            raise InputError(f"{option} would replace a file of the input directory {inside[0]}", path)
        if key in seen:
            raise InputError(f"{option} and {seen[key]} name the same file", path)
        seen[key] = option
        if option in dirs:
            if p.exists() and not p.is_dir():
                raise InputError(f"{option} must be a directory, but a file is there", path)
            _check_writable_dir(p, option, path)
        else:
            if p.is_dir():
                raise InputError(f"{option} is a directory; give a file name", path)
            if p.name in ("", ".", ".."):
                raise InputError(f"{option} needs a file name", path)
            _check_writable_dir(p.parent, option, path)


def _key(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(p)))


def _check_writable_dir(d: Path, option: str, path) -> None:
    """The nearest existing ancestor of `d` must be a directory we can create a file in."""
    d = Path(os.path.abspath(d))
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        raise InputError(f"{option}: {d} is not a directory", path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".flexmoe-probe.", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{option}: cannot write in {d}: {exc.strerror or exc}", path) from None


# --- reading -------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file, turning every way it can fail into an InputError naming the file."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InputError(f"no such {what} file", path) from None
    except IsADirectoryError:
        raise InputError(f"a directory, not a {what} file", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} file: {exc}", path) from None
    return parse_json(text, path, what)


def parse_json(text: str, path: str | os.PathLike | None, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InputError(f"not valid JSON ({what} file): nested too deeply", path) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise InputError(f"not valid JSON ({what} file): {exc}", path) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file (never unpickling), every failure an InputError naming the file."""
    try:
        with open(path, "rb") as fh:
            data = np.load(fh, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise InputError(f"a bare .npy array, not an .npz {what} archive", path)
            with data:
                return {k: data[k] for k in data.files}
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"no such {what} file", path) from None
    except IsADirectoryError:
        raise InputError(f"a directory, not a {what} file", path) from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, RuntimeError, MemoryError) as exc:
        raise InputError(f"not a readable .npz {what}: {exc}", path) from None


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
                  positive: bool = False, maximum: float | None = None) -> float:
    """A real, finite number, optionally bounded: the check every numeric field and option needs
    (NaN fails it, unlike a bare `x <= 0`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{field} must be a number, got {short(value)}", path)
    try:
        value = float(value)
    except OverflowError:
        raise InputError(f"{field} is too large", path) from None
    if not math.isfinite(value):
        raise InputError(f"{field} must be finite, got {value!r}", path)
    if positive and value <= 0:
        raise InputError(f"{field} must be positive, got {value!r}", path)
    if minimum is not None and value < minimum:
        raise InputError(f"{field} must be >= {minimum:g}, got {value!r}", path)
    if maximum is not None and value > maximum:
        raise InputError(f"{field} must be <= {maximum:g}, got {value!r}", path)
    return value


def whole_number(value: Any, field: str, path: str | os.PathLike | None, *, minimum: int = 0,
                 maximum: int = MAX_WHOLE) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{field} must be an integer, got {short(value)}", path)
    value = int(value)
    if value < minimum:
        raise InputError(f"{field} must be >= {minimum}, got {short(value)}", path)
    if value > maximum:
        raise InputError(f"{field} must be <= {maximum}, got {short(value)}", path)
    return value


def short(value: Any, limit: int = 40) -> str:
    """A value's repr cut to `limit` characters, for messages (a huge number must not flood one)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        return "a number too large to print"
    return text if len(text) <= limit else text[:limit - 3] + "..."

"""What the commands print, and where: logs go to stderr through `logging` (`--quiet` keeps
warnings and errors, `--verbose` adds debug messages); tables go to stdout unless `--quiet`; every
command ends with one summary line on stdout; progress bars appear only on a terminal."""

from __future__ import annotations

import logging
import sys

import typer

from cost_models.launch import LOGGER, configure_logging

log = logging.getLogger(LOGGER)

# Said once, where users look (the help of every command that prints a balance, and the tables).
BALANCE = ("balance = max / mean tokens per device (1.0 is perfect, higher is worse; the inverse of "
           "vLLM's and SGLang's 'balancedness', mean / max)")


def setup(quiet: bool, verbose: bool) -> None:
    configure_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def is_quiet() -> bool:
    return log.getEffectiveLevel() > logging.INFO


def table(text: str) -> None:
    """A result table or detail lines: stdout, unless --quiet."""
    if not is_quiet():
        typer.echo(text)


def summary(line: str) -> None:
    """The command's one-line summary: stdout, always."""
    typer.echo(line)


def progress(flag: bool) -> bool:
    """Progress bars only when asked, not quiet, and stderr is a terminal (never in a batch log)."""
    return flag and not is_quiet() and sys.stderr.isatty()

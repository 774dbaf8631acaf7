"""The `flexmoe` command. Each subcommand lives in `flexmoe/commands/` and stays thin.

Exit status: 0 done; 2 bad input (one line `flexmoe: error: PATH: problem`, nothing written);
1 a fault outside the input (a worker died, a write failed, a time limit passed), also one line;
130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer import Abort
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from cost_models.files import InputError, WriteError
from cost_models.launch import WorkerError
from flexmoe import __version__, console
from flexmoe.commands import cluster, compare, plan, profile, trace, train

app = typer.Typer(help="FlexMoE: profile a cluster, plan expert placement, train, compare policies. "
                       f"Throughout, {console.BALANCE}.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None)
app.command("profile")(profile.profile_cmd)
app.command("plan")(plan.plan)
app.command("train")(train.train_cmd)
app.command("compare")(compare.compare_cmd)
app.add_typer(trace.app, name="trace")
app.add_typer(cluster.app, name="cluster")

GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flexmoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False,
          quiet: Annotated[bool, typer.Option("-q", "--quiet", help="only warnings, errors and the final "
                                              "summary line (may also follow the subcommand)")] = False,
          verbose: Annotated[bool, typer.Option("-v", "--verbose", help="debug messages, and a failed "
                                                "worker's full traceback (may also follow the subcommand)")]
          = False) -> None:
    console.setup(quiet, verbose)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure ends in one line on stderr, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --quiet and --verbose are global, but users type them after the subcommand too.
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    argv = flags + [a for a in argv if a not in GLOBAL_FLAGS]
    console.setup("-q" in flags or "--quiet" in flags, "-v" in flags or "--verbose" in flags)
    try:
        code = app(args=argv, prog_name="flexmoe", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # `flexmoe` or `flexmoe trace` alone: the help
        exc.show()
        sys.exit(2)
    except ClickException as exc:  # a bad option or value: one line, and where to look
        where = f" (see: flexmoe {exc.ctx.command_path.partition(' ')[2]} --help)".replace("  ", " ") \
            if getattr(exc, "ctx", None) is not None else ""
        _fail(exc.format_message() + where, 2)
    except Abort:
        _fail("interrupted", 130)
    except InputError as exc:
        _fail(exc, 2)
    except (TimeoutError, WorkerError, WriteError) as exc:
        _fail(exc, 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(exc, code: int) -> None:
    print(f"flexmoe: error: {' '.join(str(exc).split())}", file=sys.stderr)
    sys.exit(code)

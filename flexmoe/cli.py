"""The `flexmoe` command. Each subcommand lives in `flexmoe/commands/` and stays thin."""

from __future__ import annotations

import sys

import typer

from cost_models.files import InputError
from flexmoe.commands import cluster, compare, plan, profile, trace, train

app = typer.Typer(help="FlexMoE: profile a cluster, plan expert placement, train, compare policies.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None)
app.command("profile")(profile.profile_cmd)
app.command("plan")(plan.plan)
app.command("train")(train.train_cmd)
app.command("compare")(compare.compare_cmd)
app.add_typer(trace.app, name="trace")
app.add_typer(cluster.app, name="cluster")

def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input becomes one message on stderr and exit status 2; a run that timed
    out, one message and status 1."""
    try:
        app(args=argv, prog_name="flexmoe")
    except InputError as exc:
        print(f"flexmoe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TimeoutError as exc:  # workers that did not finish in time were stopped
        print(f"flexmoe: error: {exc}", file=sys.stderr)
        sys.exit(1)

"""`flexmoe cluster`: write a named preset, or describe a cluster file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cost_models.cluster import Cluster, ExpertShape
from cost_models.files import InputError
from cost_models.presets import PRESETS, preset

app = typer.Typer(help="Cluster descriptions (cluster.json).", no_args_is_help=True)


@app.command("preset")
def preset_cmd(name: Annotated[str, typer.Argument(help=f"one of: {', '.join(PRESETS)}")],
               output: Annotated[Path, typer.Option("-o", "--output")],
               slots: Annotated[int, typer.Option(help="expert slots per device")] = 2,
               hidden: Annotated[int, typer.Option(help="expert hidden size (0: the preset's)")] = 0,
               ffn: Annotated[int, typer.Option(help="expert FFN size (0: the preset's)")] = 0,
               dtype: str = "bf16") -> None:
    """Write a preset cluster (nominal figures with their sources) to a cluster.json."""
    if slots < 1:
        raise InputError(f"--slots must be >= 1, got {slots}")
    expert = None
    if hidden or ffn:
        if hidden < 1 or ffn < 1:
            raise InputError("--hidden and --ffn must be given together, both >= 1")
        expert = ExpertShape(hidden, ffn, dtype)
    c = preset(name, slots=slots, expert=expert)
    c.save(output)
    typer.echo(f"wrote {output}: {c.name}, {c.num_devices} devices on {c.num_nodes} nodes, {slots} slots each")


@app.command("show")
def show_cmd(path: Path) -> None:
    """Describe a cluster file."""
    c = Cluster.load(path)
    typer.echo(f"{path}: {c.name}, {c.num_devices} devices on {c.num_nodes} nodes, "
               f"expert {c.expert.hidden}x{c.expert.ffn} {c.expert.dtype} ({c.expert.param_bytes / 2**20:.1f} MiB)")
    # Profiled files keep every sample in their provenance; show the short facts only.
    facts = {k: v for k, v in c.provenance.items() if isinstance(v, (str, int, float, bool))}
    typer.echo("provenance: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    for ref in c.provenance.get("references", []):
        typer.echo(f"  source: {ref}")
    for name, link in c.links.items():
        typer.echo(f"link {name}: alpha {link.alpha * 1e6:.1f} us, beta {link.beta / 1e9:.2f} GB/s")
    typer.echo(f"{'id':>3} {'node':>4} {'kind':<18} {'slots':>5} {'a (us)':>9} {'b (ns/token)':>13}")
    for d in c.devices:
        typer.echo(f"{d.id:>3} {d.node:>4} {d.kind:<18} {d.slots:>5} {d.compute.a * 1e6:>9.1f} "
                   f"{d.compute.b * 1e9:>13.3f}")

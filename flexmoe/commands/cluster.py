"""`flexmoe cluster`: write a named preset, or describe a cluster file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from cost_models.cluster import MAX_SIZE, MAX_SLOTS, Cluster, ExpertShape
from cost_models.files import check_outputs, whole_number
from cost_models.presets import preset
from flexmoe import console

app = typer.Typer(help="Cluster descriptions (cluster.json).", no_args_is_help=True)


@app.command("preset")
def preset_cmd(name: Annotated[Literal["local-cpu", "dgx-a100-2x8", "dgx-h100-8x8"], typer.Argument(help="preset")],
               output: Annotated[Path, typer.Option("-o", "--output", help="cluster.json to write")],
               slots: Annotated[int, typer.Option(help="expert slots per device")] = 2,
               hidden: Annotated[int, typer.Option(help="expert hidden size (0: the preset's)")] = 0,
               ffn: Annotated[int, typer.Option(help="expert FFN size (0: the preset's)")] = 0,
               dtype: Annotated[Optional[Literal["fp32", "fp16", "bf16", "fp8"]],
                                typer.Option(help="expert dtype (default: the preset's)")] = None) -> None:
    """Write a preset cluster (nominal figures with their sources) to a cluster.json."""
    whole_number(slots, "--slots", None, minimum=1, maximum=MAX_SLOTS)
    whole_number(hidden, "--hidden", None, maximum=MAX_SIZE)
    whole_number(ffn, "--ffn", None, maximum=MAX_SIZE)
    check_outputs({"--output": output})
    base = preset(name, slots=slots).expert
    expert = ExpertShape(hidden or base.hidden, ffn or base.ffn, dtype or base.dtype)
    c = preset(name, slots=slots, expert=expert)
    c.save(output)
    console.summary(f"wrote {output}: {c.name}, {c.num_devices} devices on {c.num_nodes} nodes, {slots} slots each, "
                    f"expert {expert.hidden}x{expert.ffn} {expert.dtype}")


@app.command("show")
def show_cmd(path: Annotated[Path, typer.Argument(help="cluster.json")]) -> None:
    """Describe a cluster file."""
    c = Cluster.load(path)
    console.summary(f"{path}: {c.name}, {c.num_devices} devices on {c.num_nodes} nodes, {int(c.slots.sum())} expert "
                    f"slots, expert {c.expert.hidden}x{c.expert.ffn} {c.expert.dtype} "
                    f"({c.expert.param_bytes / 2**20:.1f} MiB)")
    # Profiled files keep every sample in their provenance; show the short facts only.
    facts = {k: v for k, v in c.provenance.items() if isinstance(v, (str, int, float, bool))}
    lines = ["provenance: " + ", ".join(f"{k}={v}" for k, v in facts.items())]
    refs = c.provenance.get("references", [])
    lines += [f"  source: {ref}" for ref in (refs if isinstance(refs, list) else [refs])]
    lines += [f"link {name}: alpha {link.alpha * 1e6:.1f} us, beta {link.beta / 1e9:.2f} GB/s"
              for name, link in c.links.items()]
    lines.append(f"{'id':>3} {'node':>4} {'kind':<18} {'slots':>5} {'a (us)':>9} {'b (us/token)':>13}")
    lines += [f"{d.id:>3} {d.node:>4} {d.kind:<18.18} {d.slots:>5} {d.compute.a * 1e6:>9.1f} {d.compute.b * 1e6:>13.5f}"
              for d in c.devices]
    console.table("\n".join(lines))

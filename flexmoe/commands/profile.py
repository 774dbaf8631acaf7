"""`flexmoe profile`: measure the devices at hand and write a fitted cluster.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cost_models.cluster import MAX_SIZE, MAX_SLOTS, ExpertShape
from cost_models.files import check_outputs, finite_number, whole_number
from flexmoe import console

# Slots per device when --slots is 0: enough for `flexmoe trace synth`'s default 32 experts, one spare each.
TYPICAL_EXPERTS = 32


def profile_cmd(output: Annotated[Path, typer.Option("-o", "--output", help="cluster.json to write")],
                world_size: Annotated[int, typer.Option("--world-size", help="processes to spawn "
                                                        "(ignored under torchrun, which sets the ranks)")] = 2,
                device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option(help="auto: cuda when "
                                  "there is a GPU")] = "auto",
                hidden: Annotated[int, typer.Option(help="expert hidden size")] = 256,
                ffn: Annotated[int, typer.Option(help="expert FFN size")] = 1024,
                dtype: Annotated[Literal["fp32", "fp16", "bf16"], typer.Option(help="expert dtype")] = "fp32",
                slots: Annotated[int, typer.Option(help=f"expert slots per device (0: enough for a "
                                 f"{TYPICAL_EXPERTS}-expert trace with one spare each)")] = 0,
                quick: Annotated[bool, typer.Option("--quick", help="few sizes and repeats (tests)")] = False,
                all_pairs: Annotated[bool, typer.Option("--all-pairs", help="time every device pair and "
                                                        "write per-pair link overrides")] = False,
                repeats: Annotated[int, typer.Option(help="timed repeats per point (0: 5, or 3 with --quick)")] = 0,
                timeout: Annotated[float, typer.Option(help="seconds before giving up on a peer")] = 600.0,
                name: Annotated[str, typer.Option(help="cluster name (default: from the host)")] = "",
                validate: Annotated[bool, typer.Option("--validate", help="then time real skewed MoE steps "
                                                       "(world size 2) against the estimator")] = False,
                statistic: Annotated[Literal["median", "min"], typer.Option(help="per point over the "
                                     "repeats: median, or min where other programs share the cores")] = "median",
                progress: Annotated[bool, typer.Option(help="show a progress bar (only on a terminal)")] = True) -> None:
    """Time expert compute and point-to-point transfers, fit the cost models, write cluster.json.

    On CPUs it spawns --world-size gloo processes on loopback; on GPUs, NCCL with CUDA events;
    under torchrun it uses the ranks it is given and rank 0 writes the file.
    """
    from cost_models.profiler import ProfileOptions, profile

    whole_number(world_size, "--world-size", None, minimum=1, maximum=1024)
    whole_number(hidden, "--hidden", None, minimum=1, maximum=MAX_SIZE)
    whole_number(ffn, "--ffn", None, minimum=1, maximum=MAX_SIZE)
    whole_number(slots, "--slots", None, maximum=MAX_SLOTS)
    whole_number(repeats, "--repeats", None, maximum=10**6)
    finite_number(timeout, "--timeout", None, positive=True)
    check_outputs({"--output": output})
    slots = slots or -(-TYPICAL_EXPERTS // world_size) + 1
    opts = ProfileOptions(world_size=world_size, device=device, expert=ExpertShape(hidden, ffn, dtype),
                          slots=slots, quick=quick, all_pairs=all_pairs, repeats=repeats, timeout_s=timeout,
                          progress=console.progress(progress), name=name, statistic=statistic)
    cluster = profile(opts)
    if cluster is None:  # a rank other than 0 under torchrun
        return
    cluster.save(output)
    lines = [f"  device {d.id} ({d.kind}): a {d.compute.a * 1e6:.1f} us + b {d.compute.b * 1e6:.3f} us/token, "
             f"r2 {d.compute.fit['r2']:.4f}" for d in cluster.devices]
    lines += [f"  link {cls}: alpha {link.alpha * 1e6:.1f} us, beta {link.beta / 1e9:.3f} GB/s"
              for cls, link in cluster.links.items()]
    console.table("\n".join(lines))
    if validate:
        from experiments.validate_estimator import table, validate as run_validation

        console.table(table(run_validation(cluster, timeout_s=timeout)))
    console.summary(f"wrote {output}: {cluster.num_devices} devices on {cluster.num_nodes} nodes "
                    f"({cluster.provenance['backend']}), {slots} expert slots each")

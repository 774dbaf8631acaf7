"""`flexmoe profile`: measure the devices at hand and write a fitted cluster.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cost_models.cluster import DTYPE_BYTES, ExpertShape
from cost_models.files import InputError


def profile_cmd(output: Annotated[Path, typer.Option("-o", "--output", help="cluster.json to write")],
                world_size: Annotated[int, typer.Option("--world-size", help="processes to spawn "
                                                        "(ignored under torchrun, which sets the ranks)")] = 2,
                device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
                hidden: Annotated[int, typer.Option(help="expert hidden size")] = 256,
                ffn: Annotated[int, typer.Option(help="expert FFN size")] = 1024,
                dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16")] = "fp32",
                slots: Annotated[int, typer.Option(help="expert slots per device")] = 2,
                quick: Annotated[bool, typer.Option("--quick", help="few sizes and repeats (tests)")] = False,
                all_pairs: Annotated[bool, typer.Option("--all-pairs", help="time every device pair and "
                                                        "write per-pair link overrides")] = False,
                repeats: Annotated[int, typer.Option(help="timed repeats per point (0: 5, or 3 with --quick)")] = 0,
                timeout: Annotated[float, typer.Option(help="seconds before giving up on a peer")] = 600.0,
                name: Annotated[str, typer.Option(help="cluster name (default: from the host)")] = "",
                validate: Annotated[bool, typer.Option("--validate", help="then time real skewed MoE steps "
                                                       "(world size 2) against the estimator")] = False,
                statistic: Annotated[str, typer.Option(help="per point over the repeats: median, or min "
                                                       "where other programs share the cores")] = "median",
                progress: Annotated[bool, typer.Option(help="show a progress bar")] = True) -> None:
    """Time expert compute and point-to-point transfers, fit the cost models, write cluster.json.

    On CPUs it spawns --world-size gloo processes on loopback; on GPUs, NCCL with CUDA events;
    under torchrun it uses the ranks it is given and rank 0 writes the file.
    """
    from cost_models.profiler import ProfileOptions, profile

    if dtype not in DTYPE_BYTES or dtype == "fp8":
        raise InputError(f"--dtype must be fp32, fp16 or bf16, got {dtype!r}")
    if hidden < 1 or ffn < 1 or repeats < 0 or timeout <= 0:
        raise InputError("--hidden and --ffn must be >= 1, --repeats >= 0 and --timeout > 0")
    opts = ProfileOptions(world_size=world_size, device=device, expert=ExpertShape(hidden, ffn, dtype),
                          slots=slots, quick=quick, all_pairs=all_pairs, repeats=repeats, timeout_s=timeout,
                          progress=progress, name=name, statistic=statistic)
    cluster = profile(opts)
    if cluster is None:  # a rank other than 0 under torchrun
        return
    cluster.save(output)
    typer.echo(f"wrote {output}: {cluster.num_devices} devices on {cluster.num_nodes} nodes "
               f"({cluster.provenance['backend']})")
    for d in cluster.devices:
        typer.echo(f"  device {d.id} ({d.kind}): a {d.compute.a * 1e6:.1f} us + b {d.compute.b * 1e6:.3f} us/token, "
                   f"r2 {d.compute.fit['r2']:.4f}")
    for cls, link in cluster.links.items():
        typer.echo(f"  link {cls}: alpha {link.alpha * 1e6:.1f} us, beta {link.beta / 1e9:.3f} GB/s")
    if validate:
        from experiments.validate_estimator import table, validate as run_validation

        typer.echo(table(run_validation(cluster, timeout_s=timeout)))

"""`flexmoe trace`: import, synthesize and summarize routing traces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from experiments.traces import SYNTH_KINDS, imbalance_stats, import_smartmoe, synth
from planner.trace import Trace

app = typer.Typer(help="Routing traces: token counts per step, layer, source device and expert.", no_args_is_help=True)

Out = Annotated[Path, typer.Option("-o", "--output", help="Output file (.npz, or .json)")]


@app.command("import-smartmoe")
def import_smartmoe_cmd(directory: Path, output: Out,
                        micro_batches: Annotated[str, typer.Option(help="'sum' (a step per iteration) "
                                                                        "or 'split' (a step per micro-batch)")] = "sum",
                        top_k: int = 2) -> None:
    """Read SmartMoE-AE moe_trace logs (table_iter{I}_rank{R}.log) into a trace."""
    t = import_smartmoe(directory, micro_batches, top_k)
    t.save(output)
    typer.echo(f"wrote {output}: {t.num_steps} steps x {t.num_layers} layers x {t.num_sources} sources x "
               f"{t.num_experts} experts")


@app.command("import-sglang")
def import_sglang_cmd(file: Path, output: Out,
                      top_k: Annotated[int, typer.Option(help="the model's top-k (SGLang's dump does not "
                                                              "record it)")] = 1) -> None:
    """Read an SGLang expert-distribution recorder dump (stat or per_pass mode, a .pt) into a trace."""
    from experiments.sglang import import_sglang
    t = import_sglang(file, top_k)
    t.save(output)
    typer.echo(f"{file}: {t.meta['lacks']}", err=True)
    typer.echo(f"wrote {output}: {t.num_steps} passes x {t.num_layers} layers x {t.num_sources} source x "
               f"{t.num_experts} experts ({t.meta['mode']} mode)")


@app.command("synth")
def synth_cmd(kind: Annotated[str, typer.Argument(help=f"one of: {', '.join(SYNTH_KINDS)}")], output: Out,
              steps: int = 100, layers: int = 1, sources: int = 16, experts: int = 32,
              tokens_per_source: int = 4096, top_k: int = 2, seed: int = 0, alpha: float = 1.0,
              sigma: float = 1.0, drift: float = 0.1, period: int = 10, burst_prob: float = 0.05,
              burst_factor: float = 8.0, burst_len: int = 3) -> None:
    """Generate a seeded synthetic trace."""
    t = synth(kind, steps=steps, layers=layers, sources=sources, experts=experts,
              tokens_per_source=tokens_per_source, top_k=top_k, seed=seed, alpha=alpha, sigma=sigma,
              drift=drift, period=period, burst_prob=burst_prob, burst_factor=burst_factor, burst_len=burst_len)
    t.save(output)
    typer.echo(f"wrote {output}: {kind}, {steps} steps x {layers} layers x {sources} sources x {experts} experts")


@app.command("stats")
def stats_cmd(trace: Path, devices: Annotated[int, typer.Option(help="devices for plain expert parallelism "
                                                                      "(default: the trace's sources)")] = 0) -> None:
    """Per-layer imbalance: max/mean expert load, and device max/mean under plain expert parallelism."""
    t = Trace.load(trace)
    rows = imbalance_stats(t, devices or None)
    typer.echo(f"{trace}: {t.num_steps} steps, {t.num_layers} layers, {t.num_sources} sources, "
               f"{t.num_experts} experts, top-{t.top_k}, origin {t.origin or '?'}")
    typer.echo(f"{'layer':>5} {'tokens/step':>12} {'expert max/mean':>16} {'(worst)':>8} "
               f"{'EP device max/mean':>19} {'(worst)':>8}")
    for r in rows:
        typer.echo(f"{r['layer']:>5} {r['tokens_per_step']:>12.0f} {r['expert_max_over_mean']:>16.2f} "
                   f"{r['expert_max_over_mean_worst']:>8.2f} {r['device_max_over_mean']:>19.2f} "
                   f"{r['device_max_over_mean_worst']:>8.2f}")

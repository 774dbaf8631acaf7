"""`flexmoe trace`: import, synthesize and summarize routing traces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cost_models.files import check_outputs, finite_number, whole_number
from experiments.traces import imbalance_stats, import_smartmoe, synth
from flexmoe import console
from planner.trace import Trace

app = typer.Typer(help="Routing traces: token counts per step, layer, source device and expert.", no_args_is_help=True)

Out = Annotated[Path, typer.Option("-o", "--output", help="output file (.npz, or .json)")]
Opt = typer.Option


def _wrote(output: Path, t: Trace, what: str = "") -> None:
    console.summary(f"wrote {output}: {what}{t.num_steps} steps x {t.num_layers} layers x {t.num_sources} sources "
                    f"x {t.num_experts} experts, top-{t.top_k}")


@app.command("import-smartmoe")
def import_smartmoe_cmd(directory: Annotated[Path, typer.Argument(help="directory of table_iter{I}_rank{R}.log "
                                                                       "files, or the converted .npz excerpt")],
                        output: Out,
                        micro_batches: Annotated[Literal["sum", "split"],
                                                 Opt(help="sum: a step per iteration; split: a step per "
                                                          "micro-batch")] = "sum",
                        top_k: Annotated[int, Opt(help="experts per token in the traced model")] = 2) -> None:
    """Read SmartMoE-AE moe_trace logs (table_iter{I}_rank{R}.log) into a trace."""
    whole_number(top_k, "--top-k", None, minimum=1, maximum=2**16)
    check_outputs({"--output": output}, inputs=[directory])
    t = import_smartmoe(directory, micro_batches, top_k)
    t.save(output)
    _wrote(output, t)


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
def synth_cmd(kind: Annotated[Literal["uniform", "zipf", "lognormal", "drift", "rotate", "burst"],
                              typer.Argument(help="popularity model")],
              output: Out,
              steps: Annotated[int, Opt(help="trace steps")] = 100,
              layers: Annotated[int, Opt(help="MoE layers")] = 1,
              sources: Annotated[int, Opt(help="source devices (ranks that route tokens)")] = 16,
              experts: Annotated[int, Opt(help="experts per layer")] = 32,
              tokens_per_source: Annotated[int, Opt(help="tokens each source routes per step")] = 4096,
              top_k: Annotated[int, Opt(help="experts per token")] = 2,
              seed: Annotated[int, Opt(help="random seed")] = 0,
              alpha: Annotated[float, Opt(help="zipf exponent: popularity ~ 1/rank**alpha")] = 1.0,
              sigma: Annotated[float, Opt(help="lognormal: spread of log-popularity")] = 1.0,
              drift: Annotated[float, Opt(help="drift: random-walk step of log-popularity per trace step")] = 0.1,
              period: Annotated[int, Opt(help="rotate: trace steps between shifts of the hot set")] = 10,
              burst_prob: Annotated[float, Opt(help="burst: chance per step that a burst starts, in [0, 1]")] = 0.05,
              burst_factor: Annotated[float, Opt(help="burst: how many times hotter the bursting expert is")] = 8.0,
              burst_len: Annotated[int, Opt(help="burst: trace steps a burst lasts")] = 3) -> None:
    """Generate a seeded synthetic trace."""
    for value, name in ((steps, "--steps"), (layers, "--layers"), (sources, "--sources"), (experts, "--experts"),
                        (top_k, "--top-k"), (period, "--period"), (burst_len, "--burst-len")):
        whole_number(value, name, None, minimum=1, maximum=2**16)
    whole_number(steps * layers * sources * experts, "steps x layers x sources x experts", None, maximum=2**28)
    whole_number(tokens_per_source, "--tokens-per-source", None, minimum=1, maximum=2**30)
    whole_number(seed, "--seed", None, maximum=2**63 - 1)
    for value, name in ((alpha, "--alpha"), (sigma, "--sigma"), (drift, "--drift"), (burst_factor, "--burst-factor")):
        finite_number(value, name, None, minimum=0.0, maximum=1e3)
    finite_number(burst_prob, "--burst-prob", None, minimum=0.0, maximum=1.0)
    check_outputs({"--output": output})
    t = synth(kind, steps=steps, layers=layers, sources=sources, experts=experts,
              tokens_per_source=tokens_per_source, top_k=top_k, seed=seed, alpha=alpha, sigma=sigma,
              drift=drift, period=period, burst_prob=burst_prob, burst_factor=burst_factor, burst_len=burst_len)
    t.save(output)
    _wrote(output, t, f"{kind}, ")


@app.command("stats")
def stats_cmd(trace: Annotated[Path, typer.Argument(help="trace (.npz or .json)")],
              devices: Annotated[int, Opt(help="devices for plain expert parallelism "
                                               "(0: the trace's sources)")] = 0) -> None:
    """Per-layer imbalance: max/mean expert load, and device max/mean under plain expert parallelism
    (1.0 is perfect; the inverse of vLLM's and SGLang's 'balancedness')."""
    whole_number(devices, "--devices", None, maximum=2**16)
    t = Trace.load(trace)
    rows = imbalance_stats(t, devices or None)
    lines = [f"{'layer':>5} {'tokens/step':>12} {'expert max/mean':>16} {'(worst)':>8} "
             f"{'EP device max/mean':>19} {'(worst)':>8}"]
    for r in rows:
        lines.append(f"{r['layer']:>5} {r['tokens_per_step']:>12.0f} {r['expert_max_over_mean']:>16.2f} "
                     f"{r['expert_max_over_mean_worst']:>8.2f} {r['device_max_over_mean']:>19.2f} "
                     f"{r['device_max_over_mean_worst']:>8.2f}")
    console.summary(f"{trace}: {t.num_steps} steps, {t.num_layers} layers, {t.num_sources} sources, "
                    f"{t.num_experts} experts, top-{t.top_k}, origin {t.origin or '?'}")
    console.table("\n".join(lines))

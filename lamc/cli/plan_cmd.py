"""`lamc plan MODEL --topology T.yaml`: the best pipeline, its predicted costs, and why."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lamc.cli.common import capture_options, model_options, require_compile_extra
from lamc.cli.main import CommandOutcome, cli, lamc_command
from lamc.cli.options import parse_mapping
from lamc.cli.ui import Steps, stdout_console
from lamc.errors import ExitCode, UsageError
from lamc.quantity import format_bytes, format_flops, format_ms


def plan_options(fn: Any) -> Any:
    """Options shared by `plan` and `compile`: objective, constraints, budgets."""
    decorators = [
        click.option(
            "--topology",
            "-t",
            "topology_path",
            required=True,
            type=click.Path(dir_okay=False, path_type=Path),
            help="Topology file (YAML).",
        ),
        click.option(
            "--objective",
            type=click.Choice(["auto", "throughput", "latency", "generate"]),
            default="auto",
            show_default=True,
            help="Minimise the bottleneck (pipelined requests), the time of one request, or "
            "(decoders) prefill + --new-tokens decode steps; auto: generate for a decoder "
            "captured with its KV cache, else throughput.",
        ),
        click.option(
            "--new-tokens",
            type=click.IntRange(min=1),
            default=128,
            show_default=True,
            help="Objective generate: tokens generated per prompt.",
        ),
        click.option("--stages", type=click.IntRange(min=1), help="Use exactly this many stages."),
        click.option(
            "--split-after",
            "split_after",
            metavar="UNIT,...",
            help="Cut the pipeline after these units.",
        ),
        click.option(
            "--pin",
            "pins",
            multiple=True,
            metavar="UNIT=DEVICE",
            help="Place a unit (name, #index or glob) on a device.",
        ),
        click.option(
            "--forbid",
            "forbids",
            multiple=True,
            metavar="UNIT=DEVICE",
            help="Keep a unit off a device.",
        ),
        click.option("--exclude", metavar="DEVICE,...", help="Leave these devices out."),
        click.option(
            "--colocate",
            "colocates",
            multiple=True,
            metavar="UNIT+UNIT",
            help="Keep these units in one stage.",
        ),
        click.option(
            "--max-latency-ms",
            type=click.FloatRange(min=0, min_open=True),
            help="Budget: one request end to end.",
        ),
        click.option(
            "--min-throughput",
            type=click.FloatRange(min=0, min_open=True),
            help="Budget: requests per second.",
        ),
        click.option(
            "--min-memory-headroom",
            metavar="FRACTION",
            help="Budget: memory left free on every device, e.g. 10%.",
        ),
        click.option(
            "--context",
            type=click.IntRange(min=1),
            help="Decoders: plan the KV cache for this many tokens of context.",
        ),
        click.option(
            "--batch",
            "kv_batch",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Decoders: sequences whose KV cache is held at once.",
        ),
        click.option(
            "--compress",
            "compress",
            metavar="SPEC",
            help="Compress stages: auto (the planner chooses per stage), METHOD, or DEVICE_OR_KIND=METHOD,... "
            "(fp32, fp16, int8-dynamic, int8-static, int4-weight, lowrank).",
        ),
        click.option(
            "--codec",
            type=click.Choice(["raw", "fp16", "int8", "auto"]),
            default="raw",
            show_default=True,
            help="How activations travel between stages; auto: the smallest within --max-error.",
        ),
        click.option(
            "--max-error",
            type=click.FloatRange(min=0, min_open=True),
            default=0.01,
            show_default=True,
            help="Accuracy budget: max |out - ref| / max |ref| of the model outputs.",
        ),
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def plan_request(
    objective: str,
    stages: int | None,
    split_after: str | None,
    pins: tuple[str, ...],
    forbids: tuple[str, ...],
    exclude: str | None,
    colocates: tuple[str, ...],
    max_latency_ms: float | None,
    min_throughput: float | None,
    min_memory_headroom: str | None,
    kv_tokens: int,
    compare: bool,
    codec: str = "raw",
    context: int = 0,
    new_tokens: int = 128,
) -> Any:
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Budgets, Constraints, parse_fraction

    forbid: dict[str, tuple[str, ...]] = {}
    for unit, device in parse_mapping(forbids, "--forbid").items():
        forbid[unit] = (*forbid.get(unit, ()), *device.split("|"))
    headroom = None
    if min_memory_headroom is not None:
        try:
            headroom = parse_fraction(min_memory_headroom)
        except ValueError as exc:
            raise UsageError(f"--min-memory-headroom: {exc}") from None
    constraints = Constraints(
        stages=stages,
        split_after=tuple(s.strip() for s in (split_after or "").split(",") if s.strip()),
        pin=parse_mapping(pins, "--pin"),
        forbid=forbid,
        exclude=tuple(s.strip() for s in (exclude or "").split(",") if s.strip()),
        colocate=tuple(
            tuple(p.strip() for p in group.split("+") if p.strip()) for group in colocates
        ),
    )
    budgets = Budgets(
        max_latency_ms=max_latency_ms, min_throughput=min_throughput, min_memory_headroom=headroom
    )
    return PlanRequest(
        objective=objective,
        constraints=constraints,
        budgets=budgets,
        kv_tokens=kv_tokens,
        compare=compare,
        codec=codec,
        context=context,
        new_tokens=new_tokens,
    )


@cli.command("plan")
@click.argument("model")
@plan_options
@model_options
@click.option(
    "--compare",
    is_flag=True,
    help="Show the baselines (equal split, memory-proportional, single device) beside the plan.",
)
@click.option("--explain", is_flag=True, help="Show every term of the cost model.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a picture: pipeline timeline and memory per device.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@lamc_command("plan")
def plan_command(
    model: str,
    topology_path: Path,
    compare: bool,
    explain: bool,
    plot_path: Path | None,
    as_json: bool,
    **options: Any,
) -> str:
    """Find the best pipeline of MODEL over the devices of a topology (compile's dry run)."""
    require_compile_extra()
    from lamc.driver import analyse
    from lamc.passes.partition.planner import plan
    from lamc.topology import load_topology

    steps = Steps()
    topology = load_topology(topology_path)
    request = with_methods(_request(options, compare), options.get("compress"), topology)
    with steps.step("capture and analyse"):
        result = analyse(
            model,
            capture_options(
                options["dynamic"],
                options["dims"],
                options["trust_pickle"],
                options["no_weights"],
                options["kv_cache"],
            ),
            dump_ir=options["dump_ir"],
            granularity=options["granularity"],
        )
    _attach_kv(result, options)
    with steps.step("partition"):
        from lamc.driver import prepare_request

        request = prepare_request(request, result)
        best, cost = plan(result.workload, topology, request)
    if plot_path is not None:
        from lamc.cli.plot import plot_plan

        plot_plan(best, plot_path)
    if as_json:
        data = best.to_dict()
        if explain:
            data["explain"] = explain_data(best, cost)
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render_plan(best, cost, explain=explain)
    summary = describe(model, best)
    if not best.budgets_ok:
        broken = "; ".join(
            f"{b.name} {b.value:.4g} vs limit {b.limit:g} {b.unit}"
            for b in best.budgets
            if not b.ok
        )
        raise CommandOutcome(int(ExitCode.NO_FIT), f"{summary}; budget broken: {broken}")
    return summary


def _request(options: dict[str, Any], compare: bool) -> Any:
    kv_tokens = (options.get("context") or 0) * (options.get("kv_batch") or 1)
    return plan_request(
        options["objective"],
        options["stages"],
        options["split_after"],
        options["pins"],
        options["forbids"],
        options["exclude"],
        options["colocates"],
        options["max_latency_ms"],
        options["min_throughput"],
        options["min_memory_headroom"],
        kv_tokens,
        compare,
        options.get("codec") or "raw",
        options.get("context") or 0,
        options.get("new_tokens") or 128,
    )


def _attach_kv(result: Any, options: dict[str, Any]) -> None:
    """--context on a model without a KV cache is a usage error."""
    if options.get("context") and result.captured.kv_cache is None:
        raise UsageError("--context needs a decoder captured with its KV cache (for the zoo: kv=1)")


def describe(model: str, best: Any) -> str:
    return (
        f"{model} on {best.topology}: {len(best.stages)} stage(s), bottleneck {format_ms(best.bottleneck_ms)} "
        f"({best.throughput_rps:.3g} req/s), latency {format_ms(best.latency_ms)}"
    )


def with_methods(request: Any, spec: str | None, topology: Any) -> Any:
    """The request with the compression methods each device may use."""
    from dataclasses import replace

    from lamc.precision import CompressionError, resolve_methods

    try:
        return replace(request, methods=resolve_methods(spec, topology))
    except CompressionError as exc:
        raise UsageError(str(exc)) from None


def render_plan(best: Any, cost: Any, *, explain: bool) -> None:
    console = stdout_console()
    binding = ", ".join(f"{k}={v}" for k, v in best.binding.items())
    table = Table(title=f"{best.model} on {best.topology} ({best.objective}; {binding})")
    for column in (
        "stage",
        "device",
        "units",
        "params",
        "precision",
        "memory / capacity",
        "compute",
        "transfer to next",
    ):
        table.add_column(column, justify="left" if column in ("device", "units") else "right")
    for s in best.stages:
        units = (
            s.units[0] if len(s.units) == 1 else f"{s.units[0]} .. {s.units[-1]} ({len(s.units)})"
        )
        to_next = (
            f"{format_ms(s.transfer_ms)} ({format_bytes(s.transfer_bytes)})"
            if s.transfer_bytes
            else "-"
        )
        table.add_row(
            str(s.index),
            f"{s.device} ({s.kind}, {s.backend})",
            units,
            format_bytes(s.params_bytes),
            s.precision,
            f"{format_bytes(s.memory_bytes)} / {format_bytes(s.capacity_bytes)} ({s.memory_bytes / s.capacity_bytes:.0%})",
            format_ms(s.compute_ms),
            to_next,
        )
    console.print(table)
    console.print(
        f"predicted: {best.throughput_rps:.3g} req/s (bottleneck {format_ms(best.bottleneck_ms)}, limited by {best.bottleneck}); "
        f"latency {format_ms(best.latency_ms)}; fluid bound {format_ms(best.fluid_bound_ms)} "
        f"(plan at {best.fluid_ratio:.2f}x)"
    )
    counts = ", ".join(
        f"{k}: {format_ms(v) if math.isfinite(v) else 'none'}"
        for k, v in sorted(best.best_by_stages.items())
    )
    measure = {"throughput": "bottleneck", "latency": "latency"}.get(
        best.objective, f"prefill + {best.generation.get('new_tokens', 0)} decode steps"
    )
    console.print(f"best {measure} by number of stages: {counts}")
    if best.generation:
        g = best.generation
        past = ", ".join(f"{k}={v}" for k, v in g["decode_binding"].items())
        console.print(
            f"generation: prefill {format_ms(g['prefill_ms'])}, decode {format_ms(g['decode_ms_per_token'])}/token "
            f"({past}), {g['new_tokens']} tokens in {format_ms(g['total_ms'])}"
        )
        for line in g["why"]:
            console.print(f"  why {len(best.stages)} stage(s): {line}")
    for s in best.stages:
        if s.precision_reason:
            console.print(f"stage {s.index} precision {s.precision}: {s.precision_reason}")
    for name, reason in sorted(best.unused.items()):
        console.print(f"unused: {name}: {reason}")
    for c in best.constraints:
        console.print(f"constraint: {c}")
    for b in best.budgets:
        console.print(
            f"budget {b.name}: {b.value:.4g} {b.unit} vs {b.limit:g} -> {'ok' if b.ok else 'BROKEN'}"
        )
    if best.alternatives:
        alt = Table(title="compared with")
        for column in ("method", "devices", "bottleneck", "latency", "vs lamc", "fits"):
            alt.add_column(column)
        alt.add_row(
            "lamc",
            ", ".join(s.device for s in best.stages),
            format_ms(best.bottleneck_ms),
            format_ms(best.latency_ms),
            "1.00x",
            "yes",
        )
        value = best.bottleneck_ms if best.objective == "throughput" else best.latency_ms
        for a in best.alternatives:
            theirs = a.bottleneck_ms if best.objective == "throughput" else a.latency_ms
            alt.add_row(
                f"{a.name}: {a.description}",
                ", ".join(a.devices),
                format_ms(a.bottleneck_ms),
                format_ms(a.latency_ms),
                f"{theirs / value:.2f}x" if math.isfinite(theirs) else "-",
                "yes" if a.feasible else f"no: {a.reason}",
            )
        alt.add_row(
            "fluid bound (no transfers, no memory limit)",
            "all",
            format_ms(best.fluid_bound_ms),
            "-",
            f"{best.fluid_bound_ms / best.bottleneck_ms:.2f}x",
            "-",
        )
        console.print(alt)
    if explain:
        for row in explain_rows(best, cost):
            console.print(row)


def explain_data(best: Any, cost: Any) -> list[dict[str, Any]]:
    """Every term behind each stage's numbers."""
    index = {d.name: i for i, d in enumerate(cost.devices)}
    out = []
    for s in best.stages:
        d = index[s.device]
        device = cost.devices[d]
        units = []
        cached = cost.weights_cached(d, s.start_unit, s.end_unit)
        for u in range(s.start_unit, s.end_unit):
            t = (cost.cached_times if cached else cost.unit_times)[d][u]
            units.append(
                {
                    "unit": t.unit,
                    "flops": t.flops,
                    "moved_bytes": t.moved_bytes,
                    "compute_bound_ms": t.compute_bound_ms,
                    "memory_bound_ms": t.memory_bound_ms,
                    "op_overhead_ms": t.overhead_ms,
                    "ops": t.ops,
                    "total_ms": t.total_ms,
                }
            )
        mem = cost.memory(d, s.start_unit, s.end_unit)
        out.append(
            {
                "stage": s.index,
                "device": s.device,
                "peak_fp32_flops": device.peak("fp32"),
                "memory_bandwidth": device.memory_bandwidth,
                "call_overhead_ms": device.call_overhead_ms,
                "weights_in_cache": cached,
                "units": units,
                "memory": {
                    "params": mem.params,
                    "activations": mem.activations,
                    "runtime": mem.runtime,
                    "kv_cache": mem.kv_cache,
                    "capacity": mem.capacity,
                },
                "transfer": {
                    "bytes": s.transfer_bytes,
                    "route": list(s.route),
                    "ms": s.transfer_ms,
                },
            }
        )
    return out


def explain_rows(best: Any, cost: Any) -> list[str]:
    rows = [
        "",
        "how each number was computed (time = op overhead + max(FLOPs/peak, bytes/bandwidth)/efficiency, summed over ops):",
    ]
    for stage in explain_data(best, cost):
        rows.append(
            f"stage {stage['stage']} on {stage['device']}: peak {format_flops(stage['peak_fp32_flops'])}/s, "
            f"memory {format_bytes(stage['memory_bandwidth'])}/s, call overhead {format_ms(stage['call_overhead_ms'])}"
            + (", weights held in cache" if stage["weights_in_cache"] else "")
        )
        for u in stage["units"]:
            rows.append(
                f"  {u['unit']}: {format_flops(u['flops'])}, {format_bytes(u['moved_bytes'])} moved -> "
                f"compute-bound {format_ms(u['compute_bound_ms'])} + memory-bound {format_ms(u['memory_bound_ms'])} "
                f"+ overhead {format_ms(u['op_overhead_ms'])} ({u['ops']} ops) = {format_ms(u['total_ms'])}"
            )
        m = stage["memory"]
        rows.append(
            f"  memory: params {format_bytes(m['params'])} + activations {format_bytes(m['activations'])} + runtime {format_bytes(m['runtime'])}"
            + (f" + KV cache {format_bytes(m['kv_cache'])}" if m["kv_cache"] else "")
            + f" of {format_bytes(m['capacity'])}"
        )
        t = stage["transfer"]
        if t["bytes"]:
            rows.append(
                f"  transfer: {format_bytes(t['bytes'])} over {' / '.join(t['route']) or 'the host'} = {format_ms(t['ms'])}"
            )
    return rows

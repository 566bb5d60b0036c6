"""`lamc inspect MODEL|OUT`: what lamc sees in a model, or what a compiled manifest holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lamc.cli.common import capture_options, check_costs, model_options, require_compile_extra
from lamc.cli.main import cli, lamc_command
from lamc.cli.tables import Table
from lamc.cli.ui import Steps, stdout_console
from lamc.quantity import format_bytes, format_flops


@cli.command("inspect")
@click.argument("model")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@lamc_command("inspect")
def inspect_command(
    model: str,
    dynamic: str | None,
    dims: str | None,
    trust_pickle: bool,
    no_weights: bool,
    kv_cache: bool,
    granularity: str,
    strict: bool,
    dump_ir: Path | None,
    adapter: Path | None,
    as_json: bool,
) -> str:
    """Show the units of MODEL (params, FLOPs, activations, cut sizes) or a compiled OUT."""
    if (Path(model) / "manifest.json").is_file():
        from lamc.cli.manifest_view import show_manifest

        return show_manifest(Path(model), as_json=as_json)
    require_compile_extra()
    from lamc.compiler import analyse

    steps = Steps()
    with steps.step("capture and analyse"):
        result = analyse(
            model,
            capture_options(dynamic, dims, trust_pickle, no_weights, kv_cache, adapter),
            dump_ir=dump_ir,
            granularity=granularity,
        )
    check_costs(result, strict)
    workload = result.workload
    summary = workload.summary()
    summary["source"] = model
    summary["capture_s"] = round(result.seconds.get("capture", 0.0), 3)
    summary["analyse_s"] = round(result.seconds.get("analyse", 0.0), 3)
    summary["dims"] = {k: list(v) for k, v in sorted(result.captured.dims.items())}
    summary["inputs"] = result.captured.input_names
    summary["outputs"] = result.captured.output_names
    summary["warnings"] = result.captured.warnings
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        console = stdout_console()
        for warning in result.captured.warnings:
            console.print(f"warning: {warning}")
        table = Table(
            title=f"{workload.name} at {', '.join(f'{k}={v}' for k, v in sorted(workload.binding.items()))}"
        )
        for column in ("#", "unit", "kind", "nodes", "params", "FLOPs", "peak act.", "cut after"):
            table.add_column(column, justify="right" if column not in ("unit", "kind") else "left")
        for row in summary["units"]:
            table.add_row(
                str(row["index"]),
                row["name"],
                row["kind"] + (f" ({row['class']})" if row["class"] else ""),
                str(row["nodes"]),
                format_bytes(row["param_bytes"]),
                format_flops(row["flops"]),
                format_bytes(row["peak_activation_bytes"]),
                format_bytes(row["cut_bytes_after"]),
            )
        totals = summary["totals"]
        table.add_row(
            "",
            "total",
            "",
            str(sum(r["nodes"] for r in summary["units"])),
            format_bytes(totals["param_bytes"]),
            format_flops(totals["flops"]),
            "",
            "",
        )
        console.print(table)
        console.print(
            f"matrix FLOPs {format_flops(totals['matrix_flops'])}; inputs {format_bytes(totals['input_bytes'])}; "
            f"outputs {format_bytes(totals['output_bytes'])}; capture {summary['capture_s']:.2f} s, analysis {summary['analyse_s']:.2f} s"
        )
    return f"{model}: {len(workload.units)} units, {format_flops(workload.flops)}, {format_bytes(workload.param_bytes)} of parameters"

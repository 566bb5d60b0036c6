"""`lamc compile MODEL --topology T.yaml -o OUT`: the pipeline, built and written atomically."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import click

from lamc.cli.common import capture_options, check_costs, model_options, require_compile_extra
from lamc.cli.main import cli, lamc_command
from lamc.cli.plan_options import describe, plan_options, request_from_options
from lamc.cli.plan_view import render_failover, render_plan
from lamc.cli.ui import Steps, stdout_console
from lamc.quantity import format_bytes


@cli.command("compile")
@click.argument("model")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (replaced atomically).",
)
@plan_options
@model_options
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime", "tensorrt"]),
    default="auto",
    show_default=True,
    help="Engine per stage: auto takes each device's first backend lamc can build here.",
)
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Input samples for int8 (activation ranges, outlier detection; .npz: NAME, or K/NAME for sample K); default: generated.",
)
@click.option(
    "--variants",
    metavar="METHOD,...",
    help="Also build faster variants of the stages (e.g. int8-dynamic,fp16), each timed and "
    "its error measured; `lamc run --hosts ... --slo-ms` switches to them under load.",
)
@click.option("--dry-run", is_flag=True, help="Plan only (same as `lamc plan`); write nothing.")
@click.option(
    "--no-check",
    is_flag=True,
    help="Skip the ONNX checker and the ONNX Runtime load check of each stage.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a JSON report: the plan, timings and checks.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the report (plan, timings, checks, files) as JSON instead of tables.",
)
@lamc_command("compile")
def compile_command(
    model: str,
    out: Path,
    topology_path: Path,
    backend: str,
    dry_run: bool,
    no_check: bool,
    report_path: Path | None,
    variants: str | None,
    as_json: bool,
    **options: Any,
) -> str:
    """Compile MODEL into a pipeline of per-device engines and a hash-pinned manifest."""
    require_compile_extra()
    from lamc.compiler import CompileOptions, analyse, compile_model
    from lamc.compiler.variants import parse_variants

    methods = parse_variants(variants)
    if as_json:  # the JSON is all of stdout: tables off
        from lamc.cli import ui

        ui.QUIET = True

    _terminate_as_interrupt()
    if not dry_run:
        from lamc.atomic import check_writable

        check_writable(out)  # before a minute of capture, not after it
    steps = Steps()
    capture = capture_options(
        options["dynamic"],
        options["dims"],
        options["trust_pickle"],
        options["no_weights"],
        options["kv_cache"],
        options.get("adapter"),
    )
    request = request_from_options(options, compare=False)
    with steps.step("capture and analyse"):
        analysed = analyse(
            model, capture, dump_ir=options["dump_ir"], granularity=options["granularity"]
        )
    check_costs(analysed, options["strict"])
    if dry_run:
        from lamc.compiler import plan_model
        from lamc.topology import load_topology

        best, cost = plan_model(
            analysed,
            load_topology(topology_path),
            request,
            compress=options.get("compress"),
            backend=backend,
        )
        render_plan(best, cost, explain=False)
        return f"(dry run) {describe(model, best)}"
    result = compile_model(
        model,
        topology_path,
        out,
        CompileOptions(
            capture=capture,
            request=request,
            backend=backend,
            check=not no_check,
            dump_ir=options["dump_ir"],
            max_error=options["max_error"],
            compress=options.get("compress"),
            calibration=options.get("calibration"),
            failover=options.get("failover"),
            variants=methods,
        ),
        analysed=analysed,
        steps=steps,
    )
    seconds = {
        **result.seconds,
        "capture and analyse": analysed.seconds.get("capture", 0.0)
        + analysed.seconds.get("analyse", 0.0),
    }
    render_plan(result.plan, None, explain=False)
    manifest: Any = result.manifest
    render_failover(manifest.failover, result.plan.text)
    total = manifest.total_bytes()
    console = stdout_console()
    for stage in manifest.stages:
        size = sum(f.size for f in stage.files)
        console.print(
            f"stage {stage.index}: {stage.model} ({format_bytes(size)}), {stage.backend} [{', '.join(stage.providers)}], {len(stage.inputs)} in / {len(stage.outputs)} out"
        )
    for variant in manifest.variants:
        console.print(
            f"variant {variant.step}: stage {variant.stage} {variant.method} "
            f"(predicted {variant.speedup:.2f}x on its device, {variant.measured:.2f}x here), "
            f"output error {variant.error:.3g} with steps 1..{variant.step}"
        )
    if methods and not manifest.variants:
        console.print("variants: none kept (see the checks: slower here, or over --max-error)")
    if report_path is not None or as_json:
        report = {
            "out": str(out),
            "plan": result.plan.to_dict(),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "checks": result.checks,
            "files": {
                f.path: {"size": f.size, "sha256": f.sha256}
                for s in manifest.stages
                for f in s.files
            },
        }
        if report_path is not None:
            report_path.write_text(json.dumps(report, indent=2, sort_keys=True))
        if as_json:
            click.echo(json.dumps(report, indent=2, sort_keys=True))
    return f"{model} -> {out}: {len(manifest.stages)} stage(s), {format_bytes(total)}, in {sum(seconds.values()):.1f} s"


def _terminate_as_interrupt() -> None:
    """SIGTERM ends a compile like Ctrl-C: the temporary directory is removed, OUT stays."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)

"""`lamc validate OUT --model MODEL`: the pipeline against the source model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from lamc.cli.common import capture_options, model_options, require_compile_extra
from lamc.cli.main import CommandOutcome, cli, lamc_command
from lamc.cli.options import json_file_option
from lamc.cli.tables import Table
from lamc.cli.ui import Steps, stdout_console
from lamc.errors import ExitCode


@cli.command("validate")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--model", "model", help="The source model (default: the manifest's source).")
@model_options
@click.option(
    "--atol",
    type=float,
    default=1e-4,
    show_default=True,
    help="Absolute tolerance: an output passes where |pipeline - source| <= atol + rtol x |source|.",
)
@click.option(
    "--rtol",
    type=float,
    default=1e-4,
    show_default=True,
    help="Relative tolerance (see --atol).",
)
@click.option(
    "--max-error",
    type=click.FloatRange(min=0, min_open=True),
    help="Accept outputs within this relative error (default: the budget a lossy pipeline was compiled for).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Random inputs in the dynamic ranges, besides the example inputs.",
)
@click.option(
    "--providers", metavar="cpu|cuda,cpu|...", help="Override the manifest's execution providers."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@json_file_option
@lamc_command("validate")
def validate_command(
    out: Path,
    model: str | None,
    atol: float,
    rtol: float,
    max_error: float | None,
    samples: int,
    providers: str | None,
    as_json: bool,
    output_json: Path | None,
    **options: Any,
) -> str:
    """Run the source model and the pipeline on the same inputs; exit 7 past the tolerances."""
    require_compile_extra()
    from lamc.compiler.validate import compare, inputs_for, stage_report
    from lamc.frontend import capture
    from lamc.runtime.executor import Pipeline, parse_providers

    steps = Steps()
    with steps.step("verify and load"):
        pipeline = Pipeline.open(out, providers=parse_providers(providers))
    source = model or pipeline.manifest.model["source"]
    with steps.step("capture the source model"):
        # A pipeline compiled with its KV cache is checked against the source captured so.
        kv = Path(source).is_dir() and any(s.kv_cache for s in pipeline.manifest.stages)
        # A pipeline compiled with an adapter is checked against the adapted source as
        # trained (a LoRA adapter: the peft model, unmerged).
        adapter = options.get("adapter")
        if adapter is None and model is None and "adapter" in pipeline.manifest.model:
            adapter = Path(pipeline.manifest.model["adapter"])
        captured = capture(
            source,
            capture_options(
                options["dynamic"],
                options["dims"],
                options["trust_pickle"],
                kv_cache=kv,
                adapter=adapter,
            ),
        )
    if captured.reference is None:
        raise CommandOutcome(
            int(ExitCode.USAGE),
            f"{source} was captured without weights; validate needs the real model",
        )
    lossy = any(t.codec != "raw" for e in pipeline.manifest.edges for t in e.tensors) or any(
        s.precision != "fp32" for s in pipeline.manifest.stages
    )
    if max_error is None and lossy:
        max_error = pipeline.manifest.plan.get("max_error")
    cases = inputs_for(captured, pipeline.manifest, samples)
    with steps.step("compare"):
        report = compare(
            pipeline, captured.reference, cases, atol=atol, rtol=rtol, max_error=max_error
        )
    with steps.step("compare stage by stage"):
        report.stages = stage_report(pipeline, captured.model, cases)
    if output_json is not None:
        from lamc.cli.ui import write_json

        write_json(output_json, report.to_dict())
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        budget = f", or relative error <= {max_error:g}" if max_error is not None else ""
        table = Table(title=f"{out} vs {source} (atol {atol:g}, rtol {rtol:g}{budget})")
        for column in (
            "inputs",
            "output",
            "max abs error",
            "max rel error",
            "mean rel error",
            "cosine",
            "within tolerance",
        ):
            table.add_column(column)
        for row in report.rows:
            table.add_row(
                row.case,
                row.output,
                f"{row.max_abs:.3g}",
                f"{row.max_rel:.3g}",
                f"{row.mean_rel:.3g}",
                f"{row.cosine:.6f}",
                "yes" if row.ok else "NO",
            )
        stdout_console().print(table)
        per_stage = Table(title="stage by stage: each stage's outputs vs the source model's")
        for column in ("stage", "device", "precision", "max rel error", "mean rel error", "cosine"):
            per_stage.add_column(column)
        for s in report.stages:
            per_stage.add_row(
                str(s.stage),
                s.device,
                s.precision,
                f"{s.max_rel:.3g}",
                f"{s.mean_rel:.3g}",
                f"{s.cosine:.6f}",
            )
        stdout_console().print(per_stage)
    if not report.ok:
        worst = max(report.rows, key=lambda r: r.max_abs)
        raise CommandOutcome(
            int(ExitCode.ACCURACY),
            f"{out}: {worst.output} differs by {worst.max_abs:.3g} (relative {worst.max_rel:.3g}; atol {atol:g}, rtol {rtol:g}"
            + (f", budget {max_error:g}" if max_error is not None else "")
            + f") on {worst.case}",
        )
    worst_abs = max((r.max_abs for r in report.rows), default=0.0)
    worst_rel = max((r.max_rel for r in report.rows), default=0.0)
    return f"{out} vs {source}: {len(report.rows)} comparison(s), max abs error {worst_abs:.3g}, max relative error {worst_rel:.3g}"

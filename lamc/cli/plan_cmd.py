"""`lamc plan MODEL --topology T.yaml`: the best pipeline, its predicted costs, and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from lamc.cli.common import analyse_model, model_options, require_compile_extra
from lamc.cli.main import CommandOutcome, cli, lamc_command
from lamc.cli.options import json_file_option
from lamc.cli.plan_options import describe, plan_options, request_from_options
from lamc.cli.plan_view import explain_data, render_failover, render_plan
from lamc.cli.ui import Steps
from lamc.errors import ExitCode


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
@json_file_option
@lamc_command("plan")
def plan_command(
    model: str,
    topology_path: Path,
    compare: bool,
    explain: bool,
    plot_path: Path | None,
    as_json: bool,
    output_json: Path | None,
    **options: Any,
) -> str:
    """Find the best pipeline of MODEL over the devices of a topology (compile's dry run)."""
    require_compile_extra()
    from lamc.compiler import plan_model
    from lamc.topology import load_topology

    steps = Steps()
    topology = load_topology(topology_path)
    request = request_from_options(options, compare)
    with steps.step("capture and analyse"):
        result = analyse_model(model, options)
    with steps.step("partition"):
        best, cost = plan_model(result, topology, request, compress=options.get("compress"))
    failover: tuple[Any, ...] = ()
    if options.get("failover"):
        from lamc.compiler.failover import failover_plans

        with steps.step("failover plans"):
            failover = failover_plans(
                result,
                topology,
                best,
                request,
                options["failover"],
                compress=options.get("compress"),
            )
    if plot_path is not None:
        from lamc.cli.plot import plot_plan

        plot_plan(best, plot_path)
    data = best.to_dict()
    if explain:
        data["explain"] = explain_data(best, cost)
    if failover:
        data["failover"] = [f.to_dict() for f in failover]
    if output_json is not None:
        from lamc.cli.ui import write_json

        write_json(output_json, data)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render_plan(best, cost, explain=explain)
        render_failover(failover, best.text)
    summary = describe(model, best)
    if not best.budgets_ok:
        broken = "; ".join(
            f"{b.name} {b.value:.4g} vs limit {b.limit:g} {b.unit}"
            for b in best.budgets
            if not b.ok
        )
        raise CommandOutcome(int(ExitCode.NO_FIT), f"{summary}; budget broken: {broken}")
    return summary

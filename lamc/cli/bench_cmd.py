"""`lamc bench OUT`: time a compiled pipeline the way trtexec times an engine: warm-up
runs, then a number of iterations (or a duration), latency percentiles, throughput, and
each stage's measured time beside the plan's prediction.

In this process the stages run one after another, request after request, and each stage
is timed on its own. Against stage servers (`--hosts`/`--endpoint`) up to `--concurrency`
requests are in flight and each is timed from submission to answer; each server then
reports its engine's time and its hand-off to the next stage for those requests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from lamc.cli.main import cli, lamc_command
from lamc.cli.options import json_file_option, parse_sizes
from lamc.cli.run_cmd import stage_server_options
from lamc.cli.ui import stdout_console
from lamc.errors import UsageError

PERCENTILES = (50, 90, 95, 99)


@cli.command("bench")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Timed requests (at least; --duration can ask for more).",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Untimed requests first.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Keep timing requests until this many seconds have passed (and --iterations ran).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Requests in flight at once (stage servers only; this process runs one at a time).",
)
@click.option(
    "--random",
    "random_dims",
    metavar="NAME=SIZE,...",
    default="",
    help="Dim sizes of the random inputs (default: the plan's operating point).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--providers", metavar="cpu|cuda,cpu|...", help="Override the manifest's execution providers."
)
@click.option("--threads", type=click.IntRange(min=0), help="Intra-op threads per stage.")
@stage_server_options
@click.option(
    "--calibrate",
    "calibrate",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The topology OUT was compiled for: write it corrected by what was measured "
    "(each device's time_scale), for the next `lamc plan`/`compile`.",
)
@click.option(
    "--calibrated",
    "calibrated",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where --calibrate writes (default: T.calibrated.yaml beside T.yaml).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@json_file_option
@lamc_command("bench")
def bench_command(
    out: Path,
    iterations: int,
    warmup: int,
    duration: float,
    concurrency: int,
    random_dims: str,
    seed: int,
    providers: str | None,
    threads: int | None,
    hosts_file: Path | None,
    endpoints: tuple[str, ...],
    timeout_s: float,
    calibrate: Path | None,
    calibrated: Path | None,
    as_json: bool,
    output_json: Path | None,
) -> str:
    """Time OUT: latency percentiles, throughput, and per stage measured vs predicted."""
    from lamc.cli.run_cmd import random_feeds, remote_pipeline
    from lamc.runtime.executor import Pipeline, parse_providers

    remote = hosts_file is not None or bool(endpoints)
    if calibrated is not None and calibrate is None:
        raise UsageError("--calibrated is where --calibrate writes: give --calibrate T.yaml")
    if calibrate is not None and remote:
        raise UsageError(
            "--calibrate needs each stage timed on its own: run it in this process "
            "(without --hosts/--endpoint), on the device the stages are planned for"
        )
    if concurrency > 1 and not remote:
        raise UsageError(
            "--concurrency: this process runs one request at a time",
            hint="serve the stages (lamc serve) and give --hosts or --endpoint",
        )
    if remote:
        pipeline: Any = remote_pipeline(out, hosts_file, endpoints, timeout_s)
        where = f"stage servers {', '.join(pipeline.addresses)}"
    else:
        pipeline = Pipeline.open(out, providers=parse_providers(providers), threads=threads)
        where = "this process"
    try:
        manifest = pipeline.manifest
        feeds = random_feeds(manifest, parse_sizes(random_dims, "--random"), seed)
        links: dict[int, list[float]] = {}
        if remote:
            latencies, wall, stages, links = _remote_runs(
                pipeline, feeds, warmup, iterations, duration, concurrency
            )
        else:
            latencies, wall, stages = _local_runs(pipeline, feeds, warmup, iterations, duration)
    finally:
        if hasattr(pipeline, "close"):
            pipeline.close()
    report = _report(manifest, latencies, wall, stages, where, concurrency, links)
    if calibrate is not None:
        report["calibration"] = _calibrate(out, manifest, report, calibrate, calibrated)
    if output_json is not None:
        from lamc.cli.ui import write_json

        write_json(output_json, report)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print(report)
    latency = report["latency_ms"]
    return (
        f"{out}: {len(latencies)} requests in {where}, p50 {latency['p50']:.2f} ms, "
        f"p99 {latency['p99']:.2f} ms, {report['throughput_rps']:.1f} req/s"
    )


def _calibrate(
    out: Path, manifest: Any, report: dict[str, Any], source: Path, target: Path | None
) -> dict[str, Any]:
    """Write the calibrated topology; what was written, for the report."""
    import platform
    import time as clock

    from lamc.topology import load_topology
    from lamc.topology.calibrate import device_ratios, write_calibrated

    topology = load_topology(source)
    old = {d.name: d.time_scale for d in topology.devices}
    calibrations = device_ratios(report["stages"], old)
    if not calibrations:
        raise UsageError("--calibrate: no stage was timed with a prediction to compare")
    target = target or source.with_name(f"{source.stem}.calibrated.yaml")
    binding = report["predicted"]["binding"]
    note = (
        f"{source.name} calibrated by `lamc bench {out} --calibrate` on {platform.node()}, "
        f"{clock.strftime('%Y-%m-%d %H:%M')}:\n"
        f"{report['requests']} requests at {binding}; per device, measured / predicted "
        "(median of its stages) became its time_scale."
    )
    write_calibrated(source, str(manifest.topology.get("sha256", "")), calibrations, target, note)
    return {
        "topology": str(target),
        "devices": {
            c.device: {"stages": list(c.stages), "ratio": c.ratio, "time_scale": c.time_scale}
            for c in calibrations
        },
    }


def _enough(done: int, started: float, iterations: int, duration: float) -> bool:
    return done >= iterations and time.perf_counter() - started >= duration


def _local_runs(
    pipeline: Any, feeds: dict[str, np.ndarray], warmup: int, iterations: int, duration: float
) -> tuple[list[float], float, dict[int, list[float]]]:
    for _ in range(warmup):
        pipeline.run(feeds)
    latencies: list[float] = []
    stages: dict[int, list[float]] = {s.spec.index: [] for s in pipeline.stages}
    started = time.perf_counter()
    while not _enough(len(latencies), started, iterations, duration):
        timings: dict[int, float] = {}
        begun = time.perf_counter()
        pipeline.run(feeds, timings=timings)
        latencies.append(time.perf_counter() - begun)
        for index, seconds in timings.items():
            stages[index].append(seconds)
    return latencies, time.perf_counter() - started, stages


def _remote_runs(
    pipeline: Any,
    feeds: dict[str, np.ndarray],
    warmup: int,
    iterations: int,
    duration: float,
    concurrency: int,
) -> tuple[list[float], float, dict[int, list[float]], dict[int, list[float]]]:
    """Up to `concurrency` requests in flight; each timed from submission to its answer.
    A failed request fails the bench (its error names the stage). Then each stage
    server's own times for these requests: its engine's, and its hand-off onward."""
    import concurrent.futures

    for _ in range(warmup):
        pipeline.run(feeds)
    latencies: list[float] = []
    pending: dict[concurrent.futures.Future[Any], float] = {}
    started = time.perf_counter()
    submitted = 0
    while True:
        while len(pending) < concurrency and not _enough(submitted, started, iterations, duration):
            pending[pipeline.submit(feeds)] = time.perf_counter()
            submitted += 1
        if not pending:
            break
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        now = time.perf_counter()
        for future in done:
            begun = pending.pop(future)
            future.result()  # raises the stage's failure
            latencies.append(now - begun)
    wall = time.perf_counter() - started
    # What each stage server measured for these requests: its engine's time, and the
    # hand-off to the next stage (the link, the next stage's checks and its answer).
    stages: dict[int, list[float]] = {}
    links: dict[int, list[float]] = {}
    for index, (compute, handoff) in enumerate(pipeline.hop_times(len(latencies))):
        stages[index] = [ms / 1000.0 for ms in compute]
        links[index] = [ms / 1000.0 for ms in handoff]
    return latencies, wall, stages, links


def _percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    result = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    result.update(mean=float(values.mean()), min=float(values.min()), max=float(values.max()))
    return result


def _report(
    manifest: Any,
    latencies: list[float],
    wall: float,
    stages: dict[int, list[float]],
    where: str,
    concurrency: int,
    links: dict[int, list[float]] | None = None,
) -> dict[str, Any]:
    plan = manifest.plan
    rows = []
    for spec in manifest.stages:
        predicted = float(spec.predicted.get("compute_ms", 0.0)) if spec.predicted else 0.0
        transfer = float((spec.predicted or {}).get("transfer_ms", 0.0))
        row: dict[str, Any] = {
            "stage": spec.index,
            "device": spec.device,
            "predicted_compute_ms": predicted,
            "predicted_transfer_ms": transfer,
        }
        if stages.get(spec.index):
            measured = _percentiles(stages[spec.index])
            row["measured_ms"] = measured
            row["measured_over_predicted"] = measured["p50"] / predicted if predicted else None
        if links and links.get(spec.index):
            handoff = _percentiles(links[spec.index])
            row["measured_handoff_ms"] = handoff
            row["handoff_over_predicted"] = handoff["p50"] / transfer if transfer else None
        rows.append(row)
    return {
        "where": where,
        "requests": len(latencies),
        "concurrency": concurrency,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
        "latency_ms": _percentiles(latencies),
        "predicted": {
            "latency_ms": plan.get("latency_ms"),
            "throughput_rps": plan.get("throughput_rps"),
            "bottleneck_ms": plan.get("bottleneck_ms"),
            "binding": plan.get("binding"),
        },
        "stages": rows,
    }


def _print(report: dict[str, Any]) -> None:
    console = stdout_console()
    _print_timings(console, report)
    calibration = report.get("calibration")
    if calibration:
        for device, entry in calibration["devices"].items():
            console.print(
                f"calibrated {device}: measured/predicted {entry['ratio']:.2f} over stage(s) "
                f"{', '.join(map(str, entry['stages']))} -> time_scale {entry['time_scale']:.3f}",
                markup=False,
            )
        console.print(f"calibrated topology: {calibration['topology']}", markup=False)


def _print_timings(console: Any, report: dict[str, Any]) -> None:
    latency, predicted = report["latency_ms"], report["predicted"]
    console.print(
        f"{report['requests']} requests in {report['where']} "
        f"({report['concurrency']} in flight), {report['wall_s']:.2f} s: "
        f"{report['throughput_rps']:.2f} req/s (plan, pipelined over its devices: "
        f"{predicted['throughput_rps'] or 0:.2f})",
        markup=False,
    )
    console.print(
        "latency ms: "
        + ", ".join(
            f"{k} {latency[k]:.3f}" for k in ("min", "mean", *(f"p{p}" for p in PERCENTILES), "max")
        )
        + f" (plan: {predicted['latency_ms'] or 0:.3f}, transfers included)",
        markup=False,
    )
    console.print(
        "stage  device            predicted ms  measured p50  p90       p99       measured/predicted",
        markup=False,
    )
    for row in report["stages"]:
        measured = row.get("measured_ms")
        cells = (
            f"{measured['p50']:<13.3f} {measured['p90']:<9.3f} {measured['p99']:<9.3f} "
            f"{row['measured_over_predicted'] or 0:.2f}"
            if measured
            else "(not timed)"
        )
        console.print(
            f"{row['stage']:<6} {row['device']:<17} {row['predicted_compute_ms']:<13.3f} {cells}",
            markup=False,
        )
        handoff = row.get("measured_handoff_ms")
        if handoff:
            console.print(
                f"  -> link onward: predicted {row['predicted_transfer_ms']:.3f} ms, "
                f"measured hand-off p50 {handoff['p50']:.3f} ms, p90 {handoff['p90']:.3f} ms",
                markup=False,
            )

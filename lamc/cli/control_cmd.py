"""`lamc control OUT --hosts hosts.yaml --listen HOST:PORT`: the long-running controller of
a pipeline's stage servers (failover and failback), serving the current plan to clients
started with `--controller`."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from lamc.cli.main import cli, lamc_command
from lamc.errors import UsageError


@cli.command("control")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--hosts",
    "hosts_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The stage servers (`lamc serve`), every device's.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default="127.0.0.1:50050",
    show_default=True,
    help="Where clients (`--controller`) ask for the plan.",
)
@click.option(
    "--grace-s",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="How long a stage may be down before the servers switch to the failover plan.",
)
@click.option(
    "--failback-hold-s",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How long a lost device must be healthy before the servers move back.",
)
@click.option(
    "--slo-ms",
    type=click.FloatRange(min=0, min_open=True),
    help="Latency objective: while the stages' summed p95 residence time is over it, switch "
    "the next stage up the variants ladder (`lamc compile --variants`); under half of it "
    "for 3 s, switch the last one back.",
)
@click.option(
    "--max-error",
    type=click.FloatRange(min=0),
    help="With --slo-ms: never take a ladder step whose measured error is over this.",
)
@click.option("--insecure", is_flag=True, help="Listen without TLS beyond loopback.")
@lamc_command("control")
def control_command(
    out: Path,
    hosts_file: Path,
    listen: str,
    grace_s: float,
    failback_hold_s: float,
    slo_ms: float | None,
    max_error: float | None,
    insecure: bool,
) -> str:
    """Watch the stage servers of OUT; when one is lost past the grace period, switch them
    all to the failover plan compiled for losing its device (authenticated Reconfigure),
    and back when it returns. Runs until SIGTERM or SIGINT. Clients started with
    `lamc run --controller HOST:PORT` follow it instead of switching the servers
    themselves. With --slo-ms it also switches stages to their faster variants under load
    and back when it drops (every answer names the build that produced it)."""
    import asyncio

    from lamc.runtime.control import Controller
    from lamc.runtime.hosts import load_hosts
    from lamc.runtime.remote import RemotePipeline
    from lamc.runtime.security import check_bind

    endpoints = load_hosts(hosts_file)
    tls = endpoints.tls if endpoints.tls is not None and endpoints.tls.cert else None
    check_bind(listen, tls, insecure)
    if max_error is not None and slo_ms is None:
        raise UsageError("--max-error bounds the variants --slo-ms switches to: give --slo-ms")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with RemotePipeline(
        out,
        endpoints,
        failover=True,
        failover_grace_s=grace_s,
        failback_hold_s=failback_hold_s,
        slo_ms=slo_ms,
        max_error=max_error,
        observe_servers=True,
    ) as pipeline:
        controller = Controller(pipeline, listen, tls)
        loop = pipeline._loop
        asyncio.run_coroutine_threadsafe(controller.start(), loop).result(timeout=30)
        seen = 0
        if slo_ms is not None:
            logging.getLogger("lamc.control").info(
                "variants: %d ladder step(s) within the error budget, SLO %.1f ms",
                len(pipeline.ladder),
                slo_ms,
            )

        def log_switches() -> None:
            # Each switch is logged once, by its index: one that lands while this runs, or
            # just before a stop signal, is logged on the next pass or the last one.
            nonlocal seen
            for switch in pipeline.switches[seen:]:
                logging.getLogger("lamc.control").info(
                    "switched to the plan without %s (%d stages) in %.0f ms",
                    ", ".join(switch["lost"]) or "nothing (the primary plan)",
                    switch["stages"],
                    switch["switch_ms"],
                )
                seen += 1

        while not stopping.wait(0.2):
            log_switches()
        asyncio.run_coroutine_threadsafe(controller.stop(), loop).result(timeout=30)
        log_switches()
        switches = len(pipeline.switches)
        lost = ", ".join(pipeline.lost) or "none"
        variant_switches, level = len(pipeline.variant_switches), pipeline.level
    summary = f"{out}: {switches} switch(es), devices lost at the end: {lost}, plan asked {controller.asked} time(s)"
    if slo_ms is not None:
        summary += f", {variant_switches} variant switch(es), ladder level {level} at the end"
    return summary

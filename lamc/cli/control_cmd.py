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
@click.option("--insecure", is_flag=True, help="Listen without TLS beyond loopback.")
@lamc_command("control")
def control_command(
    out: Path,
    hosts_file: Path,
    listen: str,
    grace_s: float,
    failback_hold_s: float,
    insecure: bool,
) -> str:
    """Watch the stage servers of OUT; when one is lost past the grace period, switch them
    all to the failover plan compiled for losing its device (authenticated Reconfigure),
    and back when it returns. Runs until SIGTERM or SIGINT. Clients started with
    `lamc run --controller HOST:PORT` follow it instead of switching the servers
    themselves."""
    import asyncio

    from lamc.runtime.control import Controller
    from lamc.runtime.hosts import load_hosts
    from lamc.runtime.remote import RemotePipeline
    from lamc.runtime.security import check_bind

    endpoints = load_hosts(hosts_file)
    tls = endpoints.tls if endpoints.tls is not None and endpoints.tls.cert else None
    check_bind(listen, tls, insecure)
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
    ) as pipeline:
        controller = Controller(pipeline, listen, tls)
        loop = pipeline._loop
        asyncio.run_coroutine_threadsafe(controller.start(), loop).result(timeout=30)
        seen = 0
        while not stopping.wait(0.2):
            for switch in pipeline.switches[seen:]:
                logging.getLogger("lamc.control").info(
                    "switched to the plan without %s (%d stages) in %.0f ms",
                    ", ".join(switch["lost"]) or "nothing (the primary plan)",
                    switch["stages"],
                    switch["switch_ms"],
                )
            seen = len(pipeline.switches)
        asyncio.run_coroutine_threadsafe(controller.stop(), loop).result(timeout=30)
        switches = len(pipeline.switches)
        lost = ", ".join(pipeline.lost) or "none"
    return f"{out}: {switches} switch(es), devices lost at the end: {lost}, plan asked {controller.asked} time(s)"

"""`lamc ingress OUT --listen HOST:PORT`: the KServe v2 (Open Inference Protocol) gRPC
front door of a compiled pipeline, over every stage in this process or over the stage
servers of `lamc serve` (`--hosts`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from lamc.cli.main import cli, lamc_command
from lamc.cli.run_cmd import stage_server_options
from lamc.cli.serve_cmd import server_security_options
from lamc.errors import UsageError


@cli.command("ingress")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default="127.0.0.1:8001",
    show_default=True,
    help="Address to serve the KServe v2 gRPC protocol on.",
)
@stage_server_options
@click.option(
    "--failover",
    is_flag=True,
    help="With --hosts: when a stage server is lost, switch the servers to the failover "
    "plan compiled for losing its device (and send its requests again).",
)
@click.option(
    "--controller",
    metavar="HOST:PORT",
    help="With --hosts: follow the plan of a `lamc control` process.",
)
@click.option(
    "--model-name",
    help="The name clients call the model by (default: the manifest's model name).",
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Requests running at once; more are answered RESOURCE_EXHAUSTED.",
)
@server_security_options
@click.option(
    "--providers",
    metavar="cpu|cuda,cpu|...",
    help="Without --hosts: override the manifest's execution providers.",
)
@click.option(
    "--threads", type=click.IntRange(min=0), help="Without --hosts: intra-op threads per stage."
)
@lamc_command("ingress")
def ingress_command(
    out: Path,
    listen: str,
    hosts_file: Path | None,
    endpoints: tuple[str, ...],
    timeout_s: float,
    failover: bool,
    controller: str | None,
    model_name: str | None,
    max_in_flight: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    require_client_cert: bool,
    insecure: bool,
    token_file: Path | None,
    providers: str | None,
    threads: int | None,
) -> str:
    """Serve OUT to standard KServe v2 clients (tritonclient, grpcurl) until SIGTERM."""
    import asyncio

    from lamc.runtime import kserve
    from lamc.runtime.security import TlsConfig, check_bind, load_token

    remote = hosts_file is not None or bool(endpoints)
    if (failover or controller) and not remote:
        raise UsageError("--failover and --controller are for stage servers: give --hosts")
    if remote and (providers is not None or threads is not None):
        raise UsageError("--providers and --threads are the stage servers' own: not with --hosts")
    tls = TlsConfig.from_files(tls_cert, tls_key, tls_ca, require_client_cert=require_client_cert)
    check_bind(listen, tls, insecure)
    token = load_token(token_file)
    backend: Any
    if remote:
        from lamc.cli.run_cmd import remote_pipeline

        pipeline = remote_pipeline(out, hosts_file, endpoints, timeout_s, failover, controller)
        token = token or pipeline.endpoints.token
        backend = kserve.RemoteBackend(pipeline)
        where = f"stage servers {', '.join(pipeline.addresses)}"
    else:
        from lamc.runtime.executor import Pipeline, parse_providers

        local = Pipeline.open(out, providers=parse_providers(providers), threads=threads)
        backend = kserve.LocalBackend(local)
        where = f"{len(local.manifest.stages)} stage(s) in this process"
    try:
        from lamc.runtime.wire import max_message_bytes

        name = model_name or kserve.model_name(backend.manifest, out)
        ingress = kserve.Ingress(backend, name, token=token, max_in_flight=max_in_flight)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        log = logging.getLogger("lamc.ingress")

        def ready() -> None:
            log.info("model %s served (KServe v2) on %s over %s", name, listen, where)

        asyncio.run(
            kserve.serve(
                ingress,
                listen,
                tls=tls,
                max_message=max_message_bytes(backend.manifest),
                on_ready=ready,
            )
        )
    finally:
        backend.close()
    counts = ingress.counts
    return (
        f"{name} on {listen}: {counts['answered']} answered, {counts['failed']} failed, "
        f"{counts['refused']} refused as busy"
    )

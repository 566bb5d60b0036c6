"""`lamc serve OUT --stage K --listen HOST:PORT`: one stage as a gRPC microservice
(or, with `--ray ADDRESS`, every stage as a Ray Serve deployment)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from lamc.cli.main import cli, lamc_command
from lamc.errors import UsageError


def server_security_options(fn: Any) -> Any:
    """TLS (--tls-cert/--tls-key/--tls-ca, --require-client-cert), --insecure and
    --token-file: how a gRPC server of lamc's (a stage, the ingress) is reached."""
    fn = click.option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Shared token (default: $LAMC_TOKEN).",
    )(fn)
    fn = click.option(
        "--insecure",
        is_flag=True,
        help="Serve plaintext on a non-loopback address (trusted networks only).",
    )(fn)
    fn = click.option(
        "--require-client-cert",
        is_flag=True,
        help="Mutual TLS: clients must present a certificate signed by --tls-ca.",
    )(fn)
    fn = click.option(
        "--tls-ca",
        type=click.Path(dir_okay=False, path_type=Path),
        help="CA certificate: verifies the next stage, and clients with --require-client-cert.",
    )(fn)
    fn = click.option(
        "--tls-key",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Server private key (PEM).",
    )(fn)
    fn = click.option(
        "--tls-cert",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Server certificate (PEM).",
    )(fn)
    return fn


@cli.command("serve")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--stage", type=click.IntRange(min=0), help="The stage to serve.")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default="127.0.0.1:50051",
    show_default=True,
    help="Address to serve on.",
)
@click.option(
    "--next",
    "next_address",
    metavar="HOST:PORT",
    help="Where the next stage is served (or give --hosts).",
)
@click.option(
    "--hosts",
    "hosts_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Hosts file listing every stage's address.",
)
@click.option(
    "--queue",
    "queue_size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Requests held at most (waiting, running or being handed on); more are rejected at once.",
)
@click.option(
    "--max-deadline-s",
    type=click.FloatRange(min=0.001, max=86400.0),
    default=600.0,
    show_default=True,
    help="The longest deadline a request may carry; longer ones are cut to it (non-finite ones are refused).",
)
@click.option(
    "--max-sequences",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Decoders: sequences whose KV caches the stage keeps; beyond it the least recently used is dropped.",
)
@server_security_options
@click.option("--server-name", help="Name to expect in the next stage's certificate.")
@click.option(
    "--providers", metavar="cpu|cuda,cpu|...", help="Override the manifest's execution providers."
)
@click.option("--threads", type=click.IntRange(min=0), help="Intra-op threads.")
@click.option(
    "--delay-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Add this latency to every hand-off to the next stage (link emulation).",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Deploy every stage on Ray Serve at this cluster address instead.",
)
@click.option(
    "--http",
    "http_listen",
    metavar="HOST:PORT",
    help="With --ray: Serve's HTTP proxy listens here, with a KServe v2 REST ingress.",
)
@click.option(
    "--without",
    metavar="DEVICE,...",
    help="Serve stage K of the failover plan compiled for losing these devices.",
)
@click.option(
    "--standby",
    is_flag=True,
    help="Once serving, also build (in the background) the sessions of the stages this "
    "device runs in the failover plans, so a switch to one only swaps sessions.",
)
@lamc_command("serve")
def serve_command(
    out: Path,
    stage: int | None,
    listen: str,
    next_address: str | None,
    hosts_file: Path | None,
    queue_size: int,
    max_sequences: int,
    max_deadline_s: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    require_client_cert: bool,
    server_name: str | None,
    insecure: bool,
    token_file: Path | None,
    providers: str | None,
    threads: int | None,
    delay_ms: float,
    ray_address: str | None,
    http_listen: str | None,
    without: str | None,
    standby: bool,
) -> str:
    """Serve stage K of a compiled pipeline until SIGTERM (which drains it first)."""
    from lamc.runtime.executor import parse_providers
    from lamc.runtime.security import TlsConfig, load_token

    token = load_token(token_file)
    if ray_address is not None:
        from lamc.runtime.ray_serve import deploy

        names = deploy(
            out,
            ray_address,
            providers=parse_providers(providers),
            http=http_listen,
            token=token,
            threads=threads,
        )
        stages = sum(1 for n in names if n.startswith("stage") and "-r" not in n)
        replicas = sum(1 for n in names if n.startswith("stage") and "-r" in n)
        rest = f", KServe v2 REST on http://{http_listen}/v2" if http_listen else ""
        if replicas:
            rest = f", {replicas} more replica(s) of replicated stages{rest}"
        return f"{out}: deployed {stages} stage(s) on Ray Serve at {ray_address} ({', '.join(names)}){rest}"
    if http_listen is not None:
        raise UsageError("--http is for --ray: a stage server speaks gRPC (see `lamc ingress`)")
    if stage is None:
        raise UsageError("give --stage K (or --ray ADDRESS to deploy every stage on Ray Serve)")
    tls = TlsConfig.from_files(tls_cert, tls_key, tls_ca, require_client_cert=require_client_cert)
    next_tls = None
    if hosts_file is not None:
        from lamc.runtime.hosts import load_hosts

        endpoints = load_hosts(hosts_file)
        next_tls = endpoints.tls
        token = token or endpoints.token
    if next_tls is None and tls_ca is not None:
        next_tls = TlsConfig(
            cert=tls.cert if tls else None,
            key=tls.key if tls else None,
            ca=tls.ca if tls else None,
            server_name=server_name,
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from lamc.runtime.loading import devices, take
    from lamc.runtime.security import check_bind

    check_bind(listen, tls, insecure)  # a usage error before the artifact is read

    lost = devices(without)
    chosen = parse_providers(providers)

    # Begun before the command line was parsed (`lamc.cli.main`), or now: the session is
    # built on its own thread while gRPC and the server are imported.
    load = take(out, stage, without=lost, providers=chosen, threads=threads)
    if hosts_file is not None and next_address is None:
        # The stage this one hands to: the next, or in a branch-parallel pipeline the one
        # its manifest names.
        next_address = endpoints.stages.get(load.manifest.successor(stage))
    import asyncio

    from lamc.runtime.lifecycle import serve_forever
    from lamc.runtime.server import StageService

    service = StageService(
        out,
        stage,
        listen=listen,
        next_address=next_address,
        queue_size=queue_size,
        max_sequences=max_sequences,
        max_deadline_s=max_deadline_s,
        tls=tls,
        insecure=insecure,
        token=token,
        providers=chosen,
        threads=threads,
        next_tls=next_tls,
        delay_ms=delay_ms,
        without=lost,
        standby=standby,
        load=load,
    )
    asyncio.run(serve_forever(service))
    counts = service.counts
    refused = counts["rejected"] + counts["invalid"] + counts["late"] + counts["unauthenticated"]
    return (
        f"stage {stage} on {listen}: {counts['accepted'] + refused} received, "
        f"{counts['accepted']} accepted, {counts['forwarded'] + counts['delivered']} handed on, "
        f"{counts['failed']} failed, {refused} refused ({counts['rejected']} busy, "
        f"{counts['invalid']} invalid, {counts['late']} past their deadline, "
        f"{counts['unauthenticated']} unauthenticated)"
    )

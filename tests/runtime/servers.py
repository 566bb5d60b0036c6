"""Start `lamc serve` stage processes for tests and benchmarks, and wait until they are ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lamc.runtime import wire
from tests.runtime.netns import EmulatedLinks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_serving(
    address: str,
    timeout_s: float = 60.0,
    process: subprocess.Popen[bytes] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Block until the gRPC health service at `address` says SERVING (ready: loaded and warm)."""
    deadline = time.monotonic() + timeout_s
    # Reconnect quickly: gRPC's default backoff (1 s, growing) would add up to seconds
    # between the server's SERVING and this probe noticing it.
    options = [
        ("grpc.initial_reconnect_backoff_ms", 10),
        ("grpc.min_reconnect_backoff_ms", 10),
        ("grpc.max_reconnect_backoff_ms", 20),
    ]
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address, options=options)
    )
    request = health_pb2.HealthCheckRequest(service=wire.SERVICE)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"stage server for {address} exited with {process.returncode}")
            # Watch streams each change of status as it happens (no polling interval
            # added to a start-up time measured with this).
            try:
                left = max(0.1, min(1.0, deadline - time.monotonic()))
                for reply in stub.Watch(request, timeout=left):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError:
                time.sleep(0.01)
    raise TimeoutError(f"stage server at {address} not serving after {timeout_s} s")


class StageServers:
    """One `lamc serve` process per stage of `out`, on loopback ports, chained together."""

    def __init__(
        self,
        out: Path,
        stages: int,
        *,
        extra: dict[int, Sequence[str]] | None = None,
        common: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        net: EmulatedLinks | None = None,
    ) -> None:
        self.credentials = credentials
        self.net = net
        self.out = out
        self.ports = [free_port() for _ in range(stages)]
        # Where the client reaches each stage (in a namespace: over its client link).
        self.addresses = [
            f"{net.client_address(k) if net else '127.0.0.1'}:{port}"
            for k, port in enumerate(self.ports)
        ]
        self.extra = extra or {}
        self.common = tuple(common)
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * stages

    def command(self, k: int) -> list[str]:
        net = self.net
        listen = f"0.0.0.0:{self.ports[k]}" if net else self.addresses[k]
        command = [
            *(net.prefix(k) if net else []),
            sys.executable,
            "-m",
            "lamc",
            "serve",
            str(self.out),
            "--stage",
            str(k),
            "--listen",
            listen,
            *(["--insecure"] if net else []),
            *self.common,
            *self.extra.get(k, ()),
        ]
        if k + 1 < len(self.addresses):
            nxt = net.next_address(k) if net else "127.0.0.1"
            command += ["--next", f"{nxt}:{self.ports[k + 1]}"]
        return command

    def start(self, k: int, wait: bool = True) -> None:
        log = (
            open(self.log_dir / f"stage{k}.log", "ab")  # noqa: SIM115 - owned by the process
            if self.log_dir
            else subprocess.DEVNULL
        )
        self.processes[k] = subprocess.Popen(
            self.command(k), stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        if wait:
            wait_serving(self.addresses[k], process=self.processes[k], credentials=self.credentials)

    def __enter__(self) -> StageServers:
        for k in range(len(self.addresses)):
            self.start(k, wait=False)
        try:
            for k, address in enumerate(self.addresses):
                wait_serving(address, process=self.processes[k], credentials=self.credentials)
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def signal(self, k: int, sig: int) -> None:
        process = self.processes[k]
        assert process is not None
        process.send_signal(sig)

    def kill(self, k: int) -> None:
        process = self.processes[k]
        assert process is not None
        process.kill()
        process.wait(timeout=10)

    def terminate(self, k: int, timeout_s: float = 30.0) -> int:
        """SIGTERM (drain) and the exit status."""
        process = self.processes[k]
        assert process is not None
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout_s)

    def stop_all(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
        for process in self.processes:
            if process is not None:
                process.wait(timeout=10)

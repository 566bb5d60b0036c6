"""Start `lamc serve` stage processes for tests and benchmarks, and wait until they are ready."""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lamc.runtime import wire
from tests.runtime.netns import EmulatedLinks


def _worker_ports() -> Iterator[int]:
    """Ports for this test process to try, in a range of its own: the suite runs in
    pytest-xdist workers (`make test`), and a port one worker has picked but whose server
    has not bound it yet must never be handed to the other. The ranges lie below Linux's
    ephemeral ports (32768 and up), which outgoing connections take."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    low = 20000 + 1500 * (index % 8)
    start = random.randrange(1500)
    for k in itertools.count():
        yield low + (start + k) % 1500


_PORTS = _worker_ports()


def free_port() -> int:
    """A loopback port no process listens on, from this test process's own range."""
    for _ in range(1500):
        port = next(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the whole range taken: any free port
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def wait_serving(
    address: str,
    timeout_s: float = 60.0,
    process: subprocess.Popen[bytes] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    service: str = wire.SERVICE,
) -> None:
    """Block until the gRPC health service at `address` says SERVING (ready: loaded and
    warm) for `service`."""
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
    request = health_pb2.HealthCheckRequest(service=service)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server for {address} exited with {process.returncode}")
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
        # Where each stage hands on: the next, or in a branch-parallel pipeline the stage
        # its manifest names.
        from lamc.verify import read_manifest

        manifest = read_manifest(out)
        self.successor = {
            k: manifest.successor(k) for k in range(min(stages, len(manifest.stages)))
        }
        if manifest.is_dag and net is not None:
            raise ValueError("emulated links chain the stages; serve a DAG on loopback")

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
        to = self.successor.get(k, k + 1)
        if to < len(self.addresses):
            nxt = net.next_address(k) if net else "127.0.0.1"
            command += ["--next", f"{nxt}:{self.ports[to]}"]
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


class AgentProcess:
    """A `lamc agent` listening on a socket under `where`, started and ready."""

    def __init__(self, where: Path, timeout_s: float = 120.0) -> None:
        self.path = where / "sock" / "agent.sock"
        self.log = where / "agent.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lamc", "agent", "--socket", str(self.path)],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while "listening on" not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"lamc agent did not start: {self.text()}")
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        """SIGTERM (its servers drain first); its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

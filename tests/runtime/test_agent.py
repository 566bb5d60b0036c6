"""`lamc agent`: stage servers forked from a process that has imported everything, started
by `LAMC_AGENT=PATH lamc serve ...` launchers that stand in for them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lamc.cli import handover
from lamc.runtime.executor import Pipeline
from lamc.runtime.hosts import Endpoints
from lamc.runtime.remote import RemotePipeline
from tests.compiled import compile_zoo
from tests.runtime.servers import AgentProcess, StageServers, free_port, wait_serving

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


@pytest.fixture(scope="module")
def gpt2_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "gpt2"
    compile_zoo("zoo:gpt2:test", out, 3)
    return out


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    running = AgentProcess(tmp_path)
    yield running
    running.stop()


def _feeds(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"input_ids": rng.integers(0, 500, size=(1, 9)).astype(np.int64)} for _ in range(n)]


def _answers(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return True


def test_servers_forked_by_the_agent_serve_and_end_as_their_launchers_do(
    gpt2_3: Path, agent: AgentProcess, tmp_path: Path
) -> None:
    feeds = _feeds(8)
    local = Pipeline.open(gpt2_3)
    want = [local.run(f) for f in feeds]
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {handover.ENV: str(agent.path)}
    with StageServers(gpt2_3, 3, env=env, log_dir=logs) as servers:
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(gpt2_3, endpoints, timeout_s=30) as client:
            got = client.run_many(feeds, in_flight=4)
            for g, w in zip(got, want, strict=True):
                assert isinstance(g, dict), g
                assert np.array_equal(g["logits"], w["logits"])
        # Each server was forked by the agent for its launcher, none started in-process.
        launchers = [p.pid for p in servers.processes if p is not None]
        text = agent.text()
        for pid in launchers:
            assert f"for launcher {pid}: lamc serve" in text, text
        for k in range(3):
            assert "in this process" not in (logs / f"stage{k}.log").read_text()
        # SIGTERM to a launcher reaches its server, which drains; the launcher exits with
        # the server's status, and the server's own last line is in the launcher's log.
        assert servers.terminate(2) == 0
        assert "PASSED serve stage 2" in (logs / f"stage{2}.log").read_text()
        # A launcher killed outright takes its server with it, as a crash would.
        servers.kill(1)
        deadline = time.monotonic() + 10
        while _answers(servers.addresses[1]):
            assert time.monotonic() < deadline, "the killed launcher's server still answers"
            time.sleep(0.1)
        assert "is gone; killing it" in agent.text()
        # A new launcher on the same port gets a new server.
        servers.start(1)
        assert _answers(servers.addresses[1])
        # The agent's SIGTERM drains its servers; their launchers exit 0 with them.
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(timeout=60) == 0
        for k in (0, 1):
            process = servers.processes[k]
            assert process is not None and process.wait(timeout=30) == 0
    assert "PASSED agent stopped after starting 4 stage server(s)" in agent.text()
    assert not agent.path.exists()


def test_a_launcher_unlike_the_agent_is_declined_and_starts_its_own_server(
    gpt2_3: Path, agent: AgentProcess
) -> None:
    address = f"127.0.0.1:{free_port()}"
    # A launcher at another niceness: a server forked from the agent would not have it.
    process = subprocess.Popen(
        [
            "nice",
            "-n",
            "3",
            sys.executable,
            "-m",
            "lamc",
            "serve",
            str(gpt2_3),
            "--stage",
            "2",
            "--listen",
            address,
        ],
        env={**os.environ, handover.ENV: str(agent.path)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(address, process=process)  # type: ignore[arg-type]
        assert (
            os.getpriority(os.PRIO_PROCESS, process.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 3
        )
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "declined: the launcher and the agent differ in niceness" in err, err
    assert "starting the stage server in this process" in err
    # No agent there at all: the same, with the reason.
    missing = subprocess.run(
        [sys.executable, "-m", "lamc", "serve", str(gpt2_3), "--stage", "2", "--listen", "x"],
        env={**os.environ, handover.ENV: str(agent.path.parent / "none.sock")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2  # the address is bad: the in-process server says so
    assert "no agent at" in missing.stderr and "none.sock" in missing.stderr


def _ask(path: Path, payload: bytes, fds: list[int]) -> dict[str, object] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        socket.send_fds(conn, [payload], fds)
        return handover.read_message(conn)


def test_hostile_requests_are_declined_and_the_agent_keeps_serving(
    gpt2_3: Path, agent: AgentProcess
) -> None:
    fds = [0, 1, 2]
    request = {"argv": ["serve", str(gpt2_3), "--stage", "2"], "cwd": "/", "env": {}}
    cases = {
        b"\x00\x00\x00\x05abc": "timed out",  # the rest never comes
        b"\xff\xff\xff\xffx": "bytes (at most",
        b"\x00\x00\x00\x03abc": "not JSON",
        handover.encode({**request, "argv": ["compile", "x"]}): "stage servers only",
        handover.encode({**request, "argv": "serve"}): "not a list of strings",
        handover.encode({**request, "cwd": "/no/such/dir"}): "is not a directory here",
        handover.encode({**request, "env": {"A": 1}}): "not a map of strings",
    }
    for payload, expected in cases.items():
        reply = _ask(agent.path, payload, fds)
        assert reply is not None and expected in str(reply.get("refused")), (payload, reply)
    reply = _ask(agent.path, handover.encode(request), [0])
    assert reply is not None and "1 file descriptors, not 3" in str(reply["refused"])
    assert agent.process.poll() is None
    # After all that, a real launcher is served.
    with StageServers(gpt2_3, 3, env={handover.ENV: str(agent.path)}) as servers:
        assert all(_answers(a) for a in servers.addresses)
    assert agent.text().count(": lamc serve") == 3, agent.text()


def test_the_agent_refuses_a_shared_directory_and_a_taken_socket(
    agent: AgentProcess, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    run = subprocess.run(
        [sys.executable, "-m", "lamc", "agent", "--socket", str(shared / "a.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 3
    assert "writable by you alone" in run.stdout and str(shared) in run.stdout
    taken = subprocess.run(
        [sys.executable, "-m", "lamc", "agent", "--socket", str(agent.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert taken.returncode == 3 and "an agent already listens there" in taken.stdout
    # A path that is not a socket is never replaced.
    precious = agent.path.parent / "notes.txt"
    precious.write_text("keep")
    kept = subprocess.run(
        [sys.executable, "-m", "lamc", "agent", "--socket", str(precious)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert kept.returncode == 3 and "is not a socket" in kept.stdout
    assert precious.read_text() == "keep"
    assert agent.process.poll() is None


def test_which_commands_go_to_an_agent() -> None:
    assert handover.wants_agent(["serve", "out", "--stage", "1"])
    assert handover.wants_agent(["serve", "out", "--stage=0", "--listen", "h:1"])
    assert not handover.wants_agent(["serve", "out", "--ray", "auto"])
    assert not handover.wants_agent(["serve", "out", "--stage", "1", "--help"])
    assert not handover.wants_agent(["serve", "out"])
    assert not handover.wants_agent(["run", "out", "--stage", "1"])


def test_a_dead_agent_stops_its_servers_and_their_launchers_say_so(
    gpt2_3: Path, agent: AgentProcess
) -> None:
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "lamc", "serve", str(gpt2_3), "--stage", "2", "--listen", address],
        env={**os.environ, handover.ENV: str(agent.path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(address, process=process)  # type: ignore[arg-type]
        agent.process.kill()  # the server gets SIGTERM (its parent-death signal) and drains
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    assert "PASSED serve stage 2" in out, out + err
    assert "the stage server's exit status is unknown" in err, err
    assert not _answers(address)

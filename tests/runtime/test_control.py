"""`lamc control`: one controller switches the stage servers when a device is lost (and
back when it returns); clients started with `controller=` follow it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lamc.compiler import CompileOptions, compile_model
from lamc.errors import RuntimeEnvironmentError
from lamc.passes.partition.planner import PlanRequest
from lamc.runtime.executor import Pipeline
from lamc.runtime.hosts import Endpoints
from lamc.runtime.remote import RemotePipeline
from lamc.topology import Constraints
from lamc.verify import verify
from tests.compiled import MINIPCS
from tests.conftest import analysed_model
from tests.runtime.servers import StageServers, free_port

MODEL = "zoo:gpt2:test"
TOKEN = "controller-test-token"


@pytest.fixture(scope="module")
def three_devices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("control") / "gpt2"
    request = PlanRequest(constraints=Constraints(stages=3, exclude=("n100-d",)))
    compile_model(
        MODEL, MINIPCS, out, CompileOptions(request=request), analysed=analysed_model(MODEL)
    )
    return out


def _control(out: Path, hosts: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "lamc", "control", str(out), "--hosts", str(hosts), *options]


def _wait(condition: object, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_clients_follow_the_controller_through_failover_and_back(
    three_devices: Path, tmp_path: Path
) -> None:
    manifest = verify(three_devices)
    victim = 1
    lost = manifest.stages[victim].device
    primary = Pipeline.open(three_devices)
    failover = Pipeline.open(three_devices, without=(lost,))
    rng = np.random.default_rng(7)
    feeds = [{"input_ids": rng.integers(0, 500, size=(1, 9)).astype(np.int64)} for _ in range(120)]
    env = {"LAMC_TOKEN": TOKEN}
    with StageServers(three_devices, 3, log_dir=tmp_path, env=env) as servers:
        hosts = tmp_path / "hosts.yaml"
        hosts.write_text("stages:\n" + "".join(f"  - {a}\n" for a in servers.addresses))
        address = f"127.0.0.1:{free_port()}"
        log = (tmp_path / "control.log").open("w")
        control = subprocess.Popen(
            _control(
                three_devices,
                hosts,
                "--listen",
                address,
                "--grace-s",
                "0.3",
                "--failback-hold-s",
                "0.5",
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        try:
            endpoints = Endpoints(dict(enumerate(servers.addresses)), token=TOKEN)
            client = RemotePipeline(three_devices, endpoints, timeout_s=30, controller=address)
            with client:
                for f in feeds[:3]:
                    np.testing.assert_array_equal(client.run(f)["logits"], primary.run(f)["logits"])

                def kill_when_busy() -> None:
                    while client.counts["succeeded"] < 30:
                        time.sleep(0.005)
                    servers.kill(victim)

                killer = threading.Thread(target=kill_when_busy)
                killer.start()
                results = client.run_many(feeds, in_flight=8)
                killer.join()
                failed = [str(r) for r in results if isinstance(r, BaseException)]
                counts = dict(client.counts)
                assert counts["accepted"] == counts["succeeded"] + counts["failed"], counts
                # Caught in the switch and sent again; at most the in-flight window lost
                # twice, nothing waits out its deadline.
                assert len(failed) <= 8 and not any("timed out" in m for m in failed), failed
                # The client followed: it sent no Reconfigure (the controller did).
                assert [s["lost"] for s in client.switches] == [(lost,)], client.switches
                assert all(not s["load_ms"] for s in client.switches)
                for f in feeds[-10:]:
                    np.testing.assert_array_equal(
                        client.run(f)["logits"], failover.run(f)["logits"]
                    )
                # A client started now begins on the plan the servers run.
                with RemotePipeline(
                    three_devices, endpoints, timeout_s=30, controller=address
                ) as late:
                    assert late.lost == (lost,)
                    np.testing.assert_array_equal(
                        late.run(feeds[0])["logits"], failover.run(feeds[0])["logits"]
                    )
                # The device returns: the controller moves the servers back, and the
                # client follows.
                servers.start(victim)
                assert _wait(lambda: len(client.switches) == 2), client.switches
                assert client.switches[1]["lost"] == ()
                for f in feeds[:3]:
                    np.testing.assert_array_equal(client.run(f)["logits"], primary.run(f)["logits"])
        finally:
            control.send_signal(signal.SIGTERM)
            code = control.wait(timeout=30)
            log.close()
        text = (tmp_path / "control.log").read_text()
        assert code == 0, text[-3000:]
        assert f"switched to the plan without {lost}" in text, text[-3000:]
        assert "switched to the plan without nothing (the primary plan)" in text
        assert "PASSED control" in text and "2 switch(es)" in text, text[-1000:]


def test_a_client_without_the_token_is_refused_the_plan(
    three_devices: Path, tmp_path: Path
) -> None:
    with StageServers(three_devices, 3, env={"LAMC_TOKEN": TOKEN}) as servers:
        hosts = tmp_path / "hosts.yaml"
        hosts.write_text("stages:\n" + "".join(f"  - {a}\n" for a in servers.addresses))
        address = f"127.0.0.1:{free_port()}"
        control = subprocess.Popen(
            _control(three_devices, hosts, "--listen", address),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LAMC_TOKEN": TOKEN},
        )
        try:
            endpoints = Endpoints(dict(enumerate(servers.addresses)), token="wrong")
            with pytest.raises(RuntimeEnvironmentError, match="UNAUTHENTICATED"):
                RemotePipeline(three_devices, endpoints, timeout_s=30, controller=address)
        finally:
            control.send_signal(signal.SIGTERM)
            control.wait(timeout=30)

"""A branch-parallel pipeline (`zoo:fusion`: a camera tower and a microphone tower joined
by a fusion head) compiled onto three devices: the towers on the sensor boards, the join
on the server. It equals the torch model in one process and over stage servers, where
each input enters at its own branch's stage and the join waits for both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lamc.compiler import CompileOptions, compile_model
from lamc.runtime.executor import Pipeline
from lamc.runtime.failover import StageFailure
from lamc.runtime.hosts import Endpoints
from lamc.runtime.remote import RemotePipeline
from lamc.verify import read_manifest
from tests.runtime.servers import StageServers

# The sensor boards on slow uplinks: moving raw frames and samples costs more than
# running each tower where its sensor is.
TOPOLOGY = """\
lamc_topology: 1
name: boards
client: server
inputs: {pixel_values: camera, input_values: mic}
devices:
  - {name: camera, host: camera, kind: cpu, memory: 6GiB, peak: {fp32: 153.6GFLOPS}, memory_bandwidth: 17.1GB/s}
  - {name: mic, host: mic, kind: cpu, memory: 3GiB, peak: {fp32: 57.6GFLOPS}, memory_bandwidth: 12.8GB/s}
  - {name: server, host: server, kind: cpu, memory: 12GiB, peak: {fp32: 217.6GFLOPS}, memory_bandwidth: 38.4GB/s}
links:
  - {a: camera, b: server, bandwidth: 2Mbit/s, latency: 5ms}
  - {a: mic, b: server, bandwidth: 2Mbit/s, latency: 5ms}
  - {a: camera, b: mic, bandwidth: 1Mbit/s, latency: 10ms}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fusion")
    (root / "boards.yaml").write_text(TOPOLOGY)
    out = root / "out"
    compile_model("zoo:fusion:test", root / "boards.yaml", out, CompileOptions())
    return out


def _feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32),
        "input_values": rng.standard_normal((batch, 800)).astype(np.float32),
    }


def _torch(feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    from lamc.models import build

    spec = build("fusion", "test")
    with torch.no_grad():
        out = spec.module(*(torch.from_numpy(feeds[n]) for n in spec.example_inputs))
    return out.numpy()


def test_the_towers_run_on_their_sensors_boards(compiled: Path) -> None:
    manifest = read_manifest(compiled)
    assert manifest.is_dag
    by_device = {s.device: s for s in manifest.stages}
    assert set(by_device) == {"camera", "mic", "server"}
    join = by_device["server"]
    assert join.index == 2 and join.to == 3  # the last stage answers the client
    assert manifest.sources(join.index) == [by_device["camera"].index, by_device["mic"].index]
    # Each raw input goes only to its own tower's stage, from the client.
    raw = {e.target: {t.name for t in e.tensors} for e in manifest.edges if e.source == -1}
    assert raw == {
        by_device["camera"].index: {"pixel_values"},
        by_device["mic"].index: {"input_values"},
    }


def test_in_process_equals_torch(compiled: Path) -> None:
    pipeline = Pipeline.open(compiled)
    for batch, seed in ((1, 0), (3, 1)):
        feeds = _feeds(batch, seed)
        got = pipeline.run(feeds)["logits"]
        np.testing.assert_allclose(got, _torch(feeds), rtol=1e-4, atol=1e-5)


def test_over_stage_servers_equals_in_process(compiled: Path) -> None:
    pipeline = Pipeline.open(compiled)
    requests = [_feeds(1 + k % 2, 10 + k) for k in range(24)]
    with (
        StageServers(compiled, 3) as servers,
        RemotePipeline(compiled, Endpoints(dict(enumerate(servers.addresses)))) as client,
    ):
        answers = client.run_many(requests, in_flight=8)
        for feeds, answer in zip(requests, answers):
            assert not isinstance(answer, BaseException), answer
            np.testing.assert_allclose(
                answer["logits"], pipeline.run(feeds)["logits"], rtol=1e-5, atol=1e-6
            )
        assert client.counts["accepted"] == client.counts["succeeded"] == len(requests)


def test_a_missing_tower_fails_the_request_naming_it(compiled: Path) -> None:
    """With the microphone's stage gone, a request fails at once, naming that stage; the
    camera's part that reached the join expires there, and nothing hangs."""
    mic = next(s.index for s in read_manifest(compiled).stages if s.device == "mic")
    with (
        StageServers(compiled, 3) as servers,
        RemotePipeline(
            compiled, Endpoints(dict(enumerate(servers.addresses))), timeout_s=5.0
        ) as client,
    ):
        assert client.run(_feeds(1, 0))["logits"].shape == (1, 5)
        servers.kill(mic)
        with pytest.raises(StageFailure, match=f"stage {mic}"):
            client.run(_feeds(1, 1), timeout_s=1.0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["stages"][0].update(to=1), "sends"),  # camera into the microphone's tower
        (lambda m: m["stages"][2].update(to=2), "stages/2/to"),  # the last stage onto itself
        (lambda m: m["edges"].pop(2), "receives"),  # a tower's hand-off dropped
        (
            lambda m: m["edges"][0]["tensors"].append({"name": "add_615", "codec": "raw"}),
            "not inputs",
        ),
    ],
)
def test_an_inconsistent_dag_manifest_is_refused(
    compiled: Path, tmp_path: Path, edit: object, message: str
) -> None:
    import json
    import shutil

    from lamc.errors import IntegrityError

    copy = tmp_path / "out"
    shutil.copytree(compiled, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)  # type: ignore[operator]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=message):
        read_manifest(copy)


def test_the_towers_run_at_the_same_time(compiled: Path) -> None:
    """Each tower's stage hands on after 400 ms of emulated link delay: a request takes
    about one delay, not two, because the client starts both towers at once and the join
    runs when the later part arrives."""
    import time

    delay = ["--delay-ms", "400"]
    with (
        StageServers(compiled, 3, extra={0: delay, 1: delay}) as servers,
        RemotePipeline(compiled, Endpoints(dict(enumerate(servers.addresses)))) as client,
    ):
        client.run(_feeds(1, 0))  # connections and sessions warm
        started = time.perf_counter()
        client.run(_feeds(1, 1))
        elapsed = time.perf_counter() - started
    assert 0.4 <= elapsed < 0.75, f"{elapsed:.3f} s: the towers did not overlap"

"""Input locality: where an input originates (`inputs:` in the topology, `--input-on`) is
charged for moving it to the first stage, so the encoder lands next to its sensor when
that moves fewer bytes, and the chain plan stays exact."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lamc.errors import ConfigError
from lamc.passes.partition.planner import PlanRequest, plan
from lamc.topology import parse_topology
from lamc.workload import Cut, CutTensor
from tests.synthetic import chain, device_yaml

RAW = 8 * 2**20  # the camera's frames: 8 MiB a request
EMBEDDED = 64 * 2**10  # what the encoder hands on: 64 KiB


def _workload():  # type: ignore[no-untyped-def]
    """Four units; the raw input (cut 0) is large, everything after the first unit small."""
    work = chain(4, flops=2e9, params=2**20, cut=EMBEDDED)
    cuts = (Cut(0, (CutTensor("frames", "float", (RAW // 4,), RAW),)), *work.cuts[1:])
    return replace(work, cuts=cuts)


def _topology(inputs: str = "") -> object:
    # A weak camera board and a strong edge server, 20 Mbit/s apart.
    camera = device_yaml("camera", tflops=0.2)
    server = device_yaml("server", tflops=2.0)
    link = "links:\n  - {a: camera, b: server, bandwidth: 20Mbit/s, latency: 2ms}\n"
    return parse_topology("devices:\n" + camera + server + link + inputs)


def test_the_encoder_moves_to_the_sensor_and_fewer_bytes_cross_links() -> None:
    workload = _workload()
    blind, _ = plan(workload, _topology())  # type: ignore[arg-type]
    assert [s.device for s in blind.stages] == ["server"]  # the input's origin unknown
    sited, cost = plan(workload, _topology("inputs: {frames: camera}\n"))  # type: ignore[arg-type]
    assert sited.stages[0].device == "camera" and sited.stages[0].end_unit >= 1
    assert sited.inbound_bytes == 0.0  # the frames never leave the camera
    # The blind plan, run where the frames really are, moves them all to the server:
    # 8 MiB a request against the sited plan's 64 KiB of embeddings.
    server = [d.name for d in cost.devices].index("server")
    blind_bytes = cost.inbound_bytes(server) + blind.link_bytes
    assert blind_bytes == RAW
    assert sited.link_bytes == EMBEDDED and sited.link_bytes < blind_bytes / 100
    # The same through the request (`--input-on`) as through the topology.
    by_request, _ = plan(workload, _topology(), PlanRequest(input_origins={"frames": "camera"}))  # type: ignore[arg-type]
    assert by_request.text == sited.text and by_request.inbound_bytes == 0.0


def test_when_the_link_is_fast_the_server_takes_it_all() -> None:
    camera = device_yaml("camera", tflops=0.2)
    server = device_yaml("server", tflops=2.0)
    fast = "links:\n  - {a: camera, b: server, bandwidth: 100GB/s, latency: 0ms}\n"
    topology = parse_topology("devices:\n" + camera + server + fast + "inputs: {frames: camera}\n")
    best, _ = plan(_workload(), topology)
    assert [s.device for s in best.stages] == ["server"] and best.inbound_bytes == RAW


def test_bad_origins_are_named() -> None:
    with pytest.raises(ConfigError, match="no input 'pixels'"):
        plan(_workload(), _topology(), PlanRequest(input_origins={"pixels": "camera"}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no device or host 'mic'"):
        plan(_workload(), _topology(), PlanRequest(input_origins={"frames": "mic"}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"inputs\.frames"):
        _topology("inputs: {frames: nowhere}\n")

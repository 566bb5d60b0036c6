"""Backend support as a planner mask: a unit a device's backend cannot run is kept off that
device (exactly, like a forbid), the plan says why, and a unit no backend runs is refused."""

from __future__ import annotations

import pytest

from lamc.errors import UnsupportedOpError
from lamc.passes.partition.planner import PlanRequest, plan
from lamc.topology import parse_topology
from tests.synthetic import chain, device_yaml

TOPOLOGY = (
    "lamc_topology: 1\nname: two\ndevices:\n"
    + device_yaml("fast", tflops=10.0)
    + device_yaml("slow", tflops=1.0)
    + "links:\n  - {a: fast, b: slow, bandwidth: 10Gbit/s, latency: 0.1ms}\n"
)


def test_unsupported_unit_moves_to_a_device_that_runs_it() -> None:
    topology = parse_topology(TOPOLOGY)
    workload = chain(6)
    free, _ = plan(workload, topology, PlanRequest(objective="latency"))
    assert [s.device for s in free.stages] == ["fast"]  # without the mask: one fast stage
    reason = "tensorrt: q.5: TensorRT's ONNX parser has no ai.onnx::MatMulInteger"
    masked, _ = plan(
        workload,
        topology,
        PlanRequest(objective="latency", unsupported={"fast": {5: reason}}),
    )
    holder = next(s for s in masked.stages if s.start_unit <= 5 < s.end_unit)
    assert holder.device == "slow"
    assert masked.support == (f"block.5 kept off fast: {reason}",)
    assert masked.latency_ms > free.latency_ms  # the mask costs something, and it is paid


def test_a_unit_no_backend_runs_is_refused_with_every_reason() -> None:
    topology = parse_topology(TOPOLOGY)
    with pytest.raises(UnsupportedOpError) as caught:
        plan(
            chain(4),
            topology,
            PlanRequest(unsupported={"fast": {2: "no kernel A"}, "slow": {2: "no kernel B"}}),
        )
    assert "block.2" in caught.value.message
    assert "no kernel A" in caught.value.message and "no kernel B" in caught.value.message


def test_too_many_stages_for_the_linked_devices_names_the_missing_route() -> None:
    from lamc.errors import DoesNotFitError
    from lamc.topology import Constraints

    topology = parse_topology(
        "lamc_topology: 1\nname: split\ndevices:\n"
        + device_yaml("a")
        + device_yaml("b")
        + device_yaml("c")
        + "links:\n  - {a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}\n"
    )
    with pytest.raises(DoesNotFitError) as caught:
        plan(chain(6), topology, PlanRequest(constraints=Constraints(stages=3)))
    assert "stages=3" in caught.value.message
    assert "no route between a and c, b and c" in caught.value.message

"""The cost model: roofline terms, tiered memory, stage memory with tied weights."""

from __future__ import annotations

import pytest

from lamc.cost import CostModel, op_time
from lamc.topology import parse_topology
from lamc.workload import Cut, CutTensor, OpWork, Unit, Workload
from tests.synthetic import chain, device_yaml


def _device(extra: str = "") -> object:
    text = (
        "devices:\n  - {name: d, kind: cpu, memory: 8GiB, peak: {fp32: 100GFLOPS, int8: 400GFLOPS}, memory_bandwidth: 10GB/s, efficiency: {fp32: {matmul: 0.5}}, op_overhead: 2us"
        + extra
        + "}\n"
    )
    return parse_topology(text).devices[0]


def test_roofline_compute_and_memory_bound() -> None:
    device = _device()
    # 1 GFLOP at 100 GFLOP/s and 50% efficiency: 20 ms, plus 2 us overhead.
    t = op_time(device, "matmul", 1e9, 1e6, "fp32", 1e6)  # type: ignore[arg-type]
    assert t.compute_ms == pytest.approx(10.0) and t.memory_ms == pytest.approx(0.1)
    assert t.total_ms == pytest.approx(0.002 + 20.0)
    # Memory-bound: 100 MB at 10 GB/s = 10 ms / default elementwise efficiency (0.5 for cpu).
    t = op_time(device, "elementwise", 1e6, 100e6, "fp32")  # type: ignore[arg-type]
    assert t.total_ms == pytest.approx(0.002 + 10.0 / 0.5)
    # int8 uses its own peak; a fused epilogue is free.
    assert op_time(device, "matmul", 1e9, 0, "int8").compute_ms == pytest.approx(2.5)  # type: ignore[arg-type]
    assert op_time(device, "fused", 1e9, 1e9, "fp32").total_ms == 0.0  # type: ignore[arg-type]


def test_cache_tier() -> None:
    device = _device(", cache: {size: 32MiB, bandwidth: 100GB/s}")
    small = op_time(device, "elementwise", 0, 10e6, "fp32")  # type: ignore[arg-type]
    big = op_time(device, "elementwise", 0, 100e6, "fp32")  # type: ignore[arg-type]
    assert small.memory_ms == pytest.approx(0.1)  # from the cache
    assert big.memory_ms == pytest.approx(10.0)  # too big for it: memory
    streamed = op_time(device, "matmul", 0, 20e6, "fp32", 20e6)  # type: ignore[arg-type]
    held = op_time(device, "matmul", 0, 20e6, "fp32", 20e6, weights_cached=True)  # type: ignore[arg-type]
    assert streamed.memory_ms == pytest.approx(2.0) and held.memory_ms == pytest.approx(0.2)


def test_stage_compute_and_memory() -> None:
    topology = parse_topology("devices:\n" + device_yaml("a", tflops=1.0, memory="4GiB"))
    cost = CostModel(chain(4, flops=1e9, params=2**20), topology)
    # Each unit: 1 GFLOP at 1 TFLOP/s = 1 ms (efficiency 1, no overheads in this device).
    assert cost.compute_ms(0, 0, 4) == pytest.approx(4.0)
    assert cost.compute_ms(0, 1, 3) == pytest.approx(2.0)
    memory = cost.memory(0, 0, 2)
    assert memory.params == 2 * 2**20 and memory.activations == 2 * 2**20
    table = cost.compute_table()
    assert table[0, 1, 3] == pytest.approx(2.0) and table[0, 3, 1] == float("inf")


def test_tied_weights_count_once_per_stage() -> None:
    units = tuple(
        Unit(
            i,
            f"u{i}",
            "block",
            None,
            1,
            0.0,
            0.0,
            100 if i != 1 else 10,
            0,
            (OpWork("matmul", 0.0, 0.0),),
            ("tied",) if i != 1 else ("w",),
        )
        for i in range(3)
    )
    cuts = tuple(Cut(k, (CutTensor("t", "float", (1,), 4),)) for k in range(4))
    workload = Workload("tied", {}, units, cuts, shared_params={"tied": (100, (0, 2))})
    cost = CostModel(workload, parse_topology("devices:\n" + device_yaml("a")))
    assert cost.memory(0, 0, 3).params == 110  # the tied weight once
    assert cost.memory(0, 0, 1).params == 100 and cost.memory(0, 1, 3).params == 110
    assert workload.param_bytes == 110


def test_transfer_table_uses_routes() -> None:
    text = (
        "devices:\n"
        + device_yaml("a")
        + device_yaml("b")
        + "links:\n  - {a: a, b: b, bandwidth: 1GB/s, latency: 3ms}\n"
    )
    cost = CostModel(chain(2, cut=10**6), parse_topology(text))
    table = cost.transfer_table()
    assert (
        table[0, 1, 1] == pytest.approx(3 + 1.0)
        and table[1, 0, 1] == pytest.approx(4.0)
        and table[0, 0, 1] == 0
    )


def test_serialize_cost_is_charged_per_message_on_each_side() -> None:
    """`serialize:` charges a stage's own CPU for each message to or from another stage
    (cut j received when j > 0, cut k sent when k < n), and so can make one stage better."""
    import numpy as np

    from lamc.passes.partition.planner import plan

    fast = device_yaml("b", tflops=1.0)
    slow = fast.replace("name: b, host: b", "name: a, host: a").replace(
        "runtime_memory: 0B}", "runtime_memory: 0B, serialize: {overhead: 1ms, bandwidth: 1GB/s}}"
    )
    topology = parse_topology("devices:\n" + slow + fast)
    workload = chain(4, flops=1e9, params=2**20, cut=2**20)
    cost = CostModel(workload, topology)
    hop = 1.0 + 2**20 / 1e9 * 1000  # 1 ms + 1 MiB at 1 GB/s
    assert topology.devices[0].serialize_ms(2**20) == pytest.approx(hop)
    assert cost.compute_ms(0, 0, 4) == pytest.approx(4.0)  # the whole model: no messages
    assert cost.compute_ms(0, 0, 2) == pytest.approx(2.0 + hop)  # sends cut 2
    assert cost.compute_ms(0, 1, 3) == pytest.approx(2.0 + 2 * hop)  # receives and sends
    assert cost.compute_ms(0, 2, 4) == pytest.approx(2.0 + hop)  # receives cut 2
    assert cost.compute_ms(1, 1, 3) == pytest.approx(2.0)  # b states no serialize cost
    table = cost.compute_table()
    for d in range(2):
        for j in range(4):
            for k in range(j + 1, 5):
                assert table[d, j, k] == pytest.approx(cost.compute_ms(d, j, k))
    assert np.isinf(table[0, 3, 1])
    # Two devices that each pay 3 ms per message: one stage (4 ms) beats two (2 + 3 ms).
    costly = device_yaml("x").replace(
        "runtime_memory: 0B}", "runtime_memory: 0B, serialize: {overhead: 3ms}}"
    ) + device_yaml("y").replace(
        "runtime_memory: 0B}", "runtime_memory: 0B, serialize: {overhead: 3ms}}"
    )
    link = "links:\n  - {a: x, b: y, bandwidth: 100GB/s, latency: 0ms}\n"
    best, _ = plan(workload, parse_topology("devices:\n" + costly + link))
    assert len(best.stages) == 1 and best.bottleneck_ms == pytest.approx(4.0)
    cheap, _ = plan(
        workload, parse_topology("devices:\n" + device_yaml("x") + device_yaml("y") + link)
    )
    assert len(cheap.stages) == 2 and cheap.bottleneck_ms < 4.0

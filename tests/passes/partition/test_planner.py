"""The planner on synthetic workloads: it drops devices when it should, splits when it
must, honours constraints and budgets, and says why when there is no plan."""

from __future__ import annotations

import pytest

from lamc.errors import ConfigError, DoesNotFitError, ExitCode, UsageError
from lamc.passes.partition.planner import PlanRequest, plan
from lamc.topology import Budgets, Constraints, parse_topology
from tests.synthetic import chain, device_yaml


def _topology(devices: str, links: str = "") -> object:
    return parse_topology(
        "name: t\ndevices:\n" + devices + ("links:\n" + links if links else ""), "t.yaml"
    )


def _link(a: str, b: str, bandwidth: str = "10GB/s", latency: str = "0.1ms") -> str:
    return f"  - {{a: {a}, b: {b}, bandwidth: {bandwidth}, latency: {latency}}}\n"


def test_slow_link_means_one_device() -> None:
    workload = chain(8, flops=1e9, cut=8 << 20)
    devices = device_yaml("a") + device_yaml("b")
    fast, _ = plan(workload, _topology(devices, _link("a", "b", "10GB/s")))
    slow, _ = plan(workload, _topology(devices, _link("a", "b", "1Mbit/s", "50ms")))
    assert len(fast.stages) == 2  # a fast link: split the work in two
    assert len(slow.stages) == 1  # 8 MiB over 1 Mbit/s takes a minute: don't split
    assert slow.unused == {
        "b": f"a plan with more stages is no better: its best bottleneck is {slow.best_by_stages[2]:.4g} ms vs {slow.bottleneck_ms:.4g} ms with 1"
    }


def test_much_slower_second_device_is_dropped() -> None:
    workload = chain(8, flops=1e9)
    topology = _topology(
        device_yaml("fast", tflops=10.0) + device_yaml("slow", tflops=0.01), _link("fast", "slow")
    )
    result, _ = plan(workload, topology)
    assert [s.device for s in result.stages] == ["fast"]
    assert "slow" in result.unused


def test_memory_forces_a_split() -> None:
    workload = chain(8, params=1 << 30)  # 8 GiB of weights
    fast = device_yaml("a", tflops=10.0, memory="6GiB", bandwidth="10TB/s")
    slow = device_yaml("b", tflops=0.5, memory="6GiB", bandwidth="10TB/s")
    topology = _topology(fast + slow, _link("a", "b", "100Mbit/s", "5ms"))
    result, _ = plan(workload, topology)
    assert len(result.stages) == 2
    assert all(s.memory_bytes <= s.capacity_bytes for s in result.stages)
    # The fast device takes all it can hold: 5 units of 1 GiB (a sixth would not fit in 6 GiB
    # beside the activations).
    assert (
        result.stages[0].device == "a"
        and result.stages[0].end_unit - result.stages[0].start_unit == 5
    )


def test_latency_objective_counts_transfers() -> None:
    workload = chain(4, flops=1e9, cut=1 << 20)
    topology = _topology(device_yaml("a") + device_yaml("b"), _link("a", "b", "10GB/s", "0.1ms"))
    throughput, _ = plan(workload, topology, PlanRequest(objective="throughput"))
    latency, _ = plan(workload, topology, PlanRequest(objective="latency"))
    assert len(throughput.stages) == 2 and throughput.bottleneck_ms == pytest.approx(2.0)
    assert len(latency.stages) == 1 and latency.latency_ms == pytest.approx(4.0)
    # The throughput plan's latency includes the transfer: 0.1 ms + 1 MiB at 10 GB/s.
    assert throughput.latency_ms == pytest.approx(4.0 + 0.1 + 1000 * (1 << 20) / 1e10)


def test_fluid_bound_and_baselines() -> None:
    workload = chain(6, flops=1e9)
    topology = _topology(
        device_yaml("a", tflops=2.0) + device_yaml("b", tflops=1.0), _link("a", "b")
    )
    result, _ = plan(workload, topology, PlanRequest(compare=True))
    # 6 GFLOP over 3 TFLOP/s combined = 2 ms; the best contiguous plan (4 + 2 units) reaches it.
    assert result.fluid_bound_ms == pytest.approx(2.0)
    assert result.bottleneck_ms >= result.fluid_bound_ms
    assert result.fluid_ratio == pytest.approx(result.bottleneck_ms / 2.0)
    names = {a.name: a for a in result.alternatives}
    assert set(names) == {"equal", "memory", "single"}
    assert names["equal"].bottleneck_ms >= result.bottleneck_ms  # 3 + 3 units: 3 ms on b
    assert names["single"].devices == ("a",) and names["single"].bottleneck_ms == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("constraints", "check"),
    [
        (Constraints(stages=3), lambda p: len(p.stages) == 3),
        (Constraints(split_after=("block.1",)), lambda p: 2 in {s.end_unit for s in p.stages}),
        (Constraints(pin={"block.0": "b"}), lambda p: p.stages[0].device == "b"),
        (Constraints(pin={"#7": "c"}), lambda p: p.stages[-1].device == "c"),
        (Constraints(exclude=("a", "b")), lambda p: [s.device for s in p.stages] == ["c"]),
        (
            Constraints(forbid={"block.*": ("a",)}),
            lambda p: "a" not in [s.device for s in p.stages],
        ),
        (
            Constraints(colocate=(("block.2", "block.5"),)),
            lambda p: any(s.start_unit <= 2 and s.end_unit > 5 for s in p.stages),
        ),
    ],
)
def test_constraints_hold(constraints: Constraints, check: object) -> None:
    workload = chain(8, flops=1e9)
    topology = _topology(
        device_yaml("a") + device_yaml("b") + device_yaml("c"),
        _link("a", "b") + _link("b", "c") + _link("a", "c"),
    )
    result, _ = plan(workload, topology, PlanRequest(constraints=constraints))
    assert check(result), result.stages  # type: ignore[operator]


def test_conflicting_constraints_are_named() -> None:
    workload = chain(4)
    topology = _topology(device_yaml("a") + device_yaml("b"), _link("a", "b"))
    conflict = Constraints(stages=1, pin={"block.0": "a", "block.3": "b"}, exclude=())
    with pytest.raises(DoesNotFitError) as info:
        plan(workload, topology, PlanRequest(constraints=conflict))
    assert info.value.exit_code == ExitCode.NO_FIT
    message = info.value.message
    assert "stages=1" in message and "pin block.0=a" in message and "pin block.3=b" in message


def test_unknown_unit_in_constraint() -> None:
    with pytest.raises(UsageError, match="no unit matches 'nope'"):
        plan(
            chain(2),
            _topology(device_yaml("a")),
            PlanRequest(constraints=Constraints(pin={"nope": "a"})),
        )


def test_does_not_fit_names_needs_and_capacities() -> None:
    workload = chain(4, params=4 << 30)  # 16 GiB
    topology = _topology(
        device_yaml("a", memory="6GiB") + device_yaml("b", memory="6GiB"), _link("a", "b")
    )
    with pytest.raises(DoesNotFitError) as info:
        plan(workload, topology)
    message = info.value.message
    assert "16.00 GiB of parameters" in message
    assert "a has 6.00 GiB free (holds at most 1 of 4 units)" in message
    assert info.value.hint is not None and "compress" in info.value.hint


def test_devices_without_a_route_are_a_topology_error() -> None:
    workload = chain(4, params=3 << 30)  # 12 GiB: needs both devices
    topology = _topology(device_yaml("a", memory="8GiB") + device_yaml("b", memory="8GiB"))
    with pytest.raises(ConfigError) as info:
        plan(workload, topology)
    assert info.value.exit_code == ExitCode.CONFIG
    assert "no path between them (a and b)" in info.value.message


def test_budgets() -> None:
    workload = chain(4, flops=1e9, params=1 << 30)
    topology = _topology(
        device_yaml("a", memory="8GiB") + device_yaml("b", memory="8GiB"),
        _link("a", "b", "1GB/s", "1ms"),
    )
    ok, _ = plan(
        workload, topology, PlanRequest(budgets=Budgets(max_latency_ms=10, min_throughput=200))
    )
    assert ok.budgets_ok and {b.name for b in ok.budgets} == {"max_latency_ms", "min_throughput"}
    # 60% headroom: each 8 GiB device may use 3.2 GiB, so the 4 GiB of weights must split.
    roomy, _ = plan(
        workload,
        topology,
        PlanRequest(objective="latency", budgets=Budgets(min_memory_headroom=0.6)),
    )
    assert len(roomy.stages) == 2 and all(
        1 - s.memory_bytes / s.capacity_bytes >= 0.6 for s in roomy.stages
    )
    # Split 2 + 2, the link is the bottleneck: 1 ms + 1 MiB at 1 GB/s = 2.05 ms, 488 req/s.
    with pytest.raises(
        DoesNotFitError, match=r"min_throughput 1000/s: the best plan reaches 488/s"
    ):
        plan(workload, topology, PlanRequest(budgets=Budgets(min_throughput=1000)))
    with pytest.raises(DoesNotFitError, match=r"max_latency_ms 3: the best plan takes 4 ms"):
        plan(
            workload, topology, PlanRequest(objective="latency", budgets=Budgets(max_latency_ms=3))
        )


def test_latency_budget_picks_another_throughput_plan() -> None:
    """The throughput-optimal plan splits over a slow link; under a latency budget the
    planner settles for the best bottleneck whose latency fits."""
    workload = chain(4, flops=1e9, cut=1 << 20)
    # A fast but distant link: splitting halves the bottleneck (4 -> 2 ms) but adds 1.6 ms.
    topology = _topology(device_yaml("a") + device_yaml("b"), _link("a", "b", "10GB/s", "1.5ms"))
    free, _ = plan(workload, topology)
    assert (
        len(free.stages) == 2 and free.bottleneck_ms == pytest.approx(2.0) and free.latency_ms > 5
    )
    bounded, _ = plan(workload, topology, PlanRequest(budgets=Budgets(max_latency_ms=5)))
    assert (
        len(bounded.stages) == 1 and bounded.latency_ms == pytest.approx(4.0) and bounded.budgets_ok
    )


def test_json_is_deterministic() -> None:
    workload = chain(10, flops=1e9)
    topology = _topology(
        device_yaml("a") + device_yaml("b") + device_yaml("c"), _link("a", "b") + _link("b", "c")
    )
    first = plan(workload, topology, PlanRequest(compare=True))[0].to_json()
    second = plan(workload, topology, PlanRequest(compare=True))[0].to_json()
    assert first == second

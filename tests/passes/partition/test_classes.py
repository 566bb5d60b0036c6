"""Identical devices form classes: the search counts how many of each it uses, stays
exact (equal to brute force), and plans dozens of boards at once; beyond its memory
budget it says it searched with a beam, and its plan is still a valid one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.passes.partition import dp
from lamc.passes.partition.dp import LATENCY, THROUGHPUT, PartitionProblem, solve
from lamc.passes.partition.planner import plan
from lamc.topology import parse_topology
from tests.passes.partition.brute import brute_force
from tests.synthetic import chain, device_yaml


@st.composite
def with_twins(draw: st.DrawFn) -> PartitionProblem:
    """2-4 kinds of device, each present 1-3 times with identical costs and links."""
    n = draw(st.integers(1, 8))
    kinds = draw(st.integers(1, 3))
    copies = [draw(st.integers(1, 3)) for _ in range(kinds)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind_of = [k for k, c in enumerate(copies) for _ in range(c)][:5]
    d_count = len(kind_of)
    unit_ms = rng.uniform(0.1, 10.0, size=(kinds, n))
    params = rng.uniform(1, 10, size=n)
    memory = rng.uniform(0.3, 1.2, size=kinds) * params.sum()
    prefix = np.concatenate([np.zeros((kinds, 1)), np.cumsum(unit_ms, axis=1)], axis=1)
    pprefix = np.concatenate([[0.0], np.cumsum(params)])
    compute = np.full((d_count, n + 1, n + 1), math.inf)
    for d, k in enumerate(kind_of):
        for j in range(n):
            for e in range(j + 1, n + 1):
                if pprefix[e] - pprefix[j] <= memory[k]:
                    compute[d, j, e] = prefix[k, e] - prefix[k, j]
    cut = rng.uniform(0, 5, size=n + 1)
    speed = rng.uniform(0.2, 5, size=(kinds, kinds))
    speed = (speed + speed.T) / 2
    transfer = np.zeros((d_count, d_count, n + 1))
    for a in range(d_count):
        for b in range(d_count):
            if a != b:
                transfer[a, b] = cut / speed[kind_of[a], kind_of[b]]
    stages = draw(st.one_of(st.none(), st.integers(1, d_count)))
    return PartitionProblem(compute, transfer, np.zeros(d_count), np.zeros(d_count), stages)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(with_twins(), st.sampled_from([THROUGHPUT, LATENCY]))
def test_class_search_equals_brute_force(problem: PartitionProblem, objective: str) -> None:
    solution = solve(problem, objective)
    want = brute_force(problem, objective)
    if not math.isfinite(want):
        assert solution is None
        return
    assert solution is not None
    assert math.isclose(solution.value, want, rel_tol=1e-9, abs_tol=1e-9)
    devices = [s.device for s in solution.segments]
    assert len(set(devices)) == len(devices)  # each device holds at most one stage


def _lan(count: int, *, distinct: bool = False) -> str:
    """`count` boards on one switch (every host linked to the switch host)."""
    text = "lamc_topology: 1\nname: lan\ndevices:\n"
    for i in range(count):
        text += device_yaml(
            f"b{i}", tflops=1.0 + (0.1 * i if distinct else 0.0), memory="2GiB", host=f"h{i}"
        )
    text += "  - {name: switch, host: sw, kind: cpu, memory: 1GiB, peak: {fp32: 1GFLOPS}, memory_bandwidth: 1GB/s, runtime_memory: 0B}\n"
    text += "links:\n" + "".join(
        f"  - {{a: h{i}, b: sw, bandwidth: 1Gbit/s, latency: 0.2ms}}\n" for i in range(count)
    )
    return text


def test_sixty_four_identical_boards_are_one_class() -> None:
    best, _ = plan(chain(24, params=300 * 2**20), parse_topology(_lan(64)))
    assert best.search.startswith("exact over")  # the boards, and the switch's own class
    assert len(best.stages) >= 4 and len({s.device for s in best.stages}) == len(best.stages)


def test_a_clique_with_an_isolated_device_plans() -> None:
    text = "lamc_topology: 1\nname: clique\ndevices:\n"
    for i in range(13):
        text += device_yaml(f"d{i}", tflops=1.0 + 0.05 * i, memory="8GiB")
    text += "links:\n" + "".join(
        f"  - {{a: d{i}, b: d{j}, bandwidth: 1Gbit/s, latency: 1ms}}\n"
        for i in range(12)
        for j in range(i + 1, 12)
    )  # d12 has no link at all
    best, _ = plan(chain(12), parse_topology(text))
    assert best.search == "exact" and best.stages
    assert "d12" not in [s.device for s in best.stages] or len(best.stages) == 1


def test_over_the_memory_budget_the_search_is_a_beam_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workload, topology = chain(10, params=400 * 2**20), parse_topology(_lan(6, distinct=True))
    exact, _ = plan(workload, topology)
    monkeypatch.setattr(dp, "MEMORY_BUDGET_BYTES", 1024)
    monkeypatch.setattr(dp, "BEAM_WIDTH", 4)
    approximate, _ = plan(workload, topology)
    assert exact.search == "exact"
    assert approximate.search.startswith("beam search, 4 states")
    # A real plan, no better than the exact one.
    assert approximate.bottleneck_ms >= exact.bottleneck_ms * (1 - 1e-9)
    assert approximate.stages[-1].end_unit == 10

"""The exact partitioner equals brute-force enumeration on random instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.passes.partition.dp import LATENCY, THROUGHPUT, PartitionProblem, Segment, evaluate, solve
from tests.passes.partition.brute import brute_force


@st.composite
def problems(draw: st.DrawFn) -> PartitionProblem:
    """1-12 units, 1-4 devices, random unit costs, memories and links (some missing)."""
    n = draw(st.integers(1, 12))
    d_count = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    unit_ms = rng.uniform(0.1, 10.0, size=(d_count, n)) * rng.uniform(0.2, 5.0, size=(d_count, 1))
    params = rng.uniform(1, 10, size=n)
    memory = rng.uniform(0.3, 1.2, size=d_count) * params.sum()
    overhead = rng.uniform(0, 1, size=d_count)
    compute = np.full((d_count, n + 1, n + 1), math.inf)
    prefix = np.concatenate([np.zeros((d_count, 1)), np.cumsum(unit_ms, axis=1)], axis=1)
    pprefix = np.concatenate([[0.0], np.cumsum(params)])
    for d in range(d_count):
        for j in range(n):
            for k in range(j + 1, n + 1):
                if pprefix[k] - pprefix[j] <= memory[d]:
                    compute[d, j, k] = overhead[d] + prefix[d, k] - prefix[d, j]
    cut_bytes = rng.uniform(0, 5, size=n + 1)
    transfer = np.zeros((d_count, d_count, n + 1))
    for a in range(d_count):
        for b in range(d_count):
            if a != b:
                if rng.uniform() < 0.15:
                    transfer[a, b] = math.inf  # no route
                else:
                    transfer[a, b] = rng.uniform(0, 3) + cut_bytes / rng.uniform(0.2, 5)
    with_client = draw(st.booleans())
    inbound = rng.uniform(0, 2, size=d_count) if with_client else np.zeros(d_count)
    outbound = rng.uniform(0, 2, size=d_count) if with_client else np.zeros(d_count)
    stages = draw(st.one_of(st.none(), st.integers(1, d_count)))
    return PartitionProblem(compute, transfer, inbound, outbound, stages=stages)


@settings(max_examples=320, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([THROUGHPUT, LATENCY]))
def test_equals_brute_force(problem: PartitionProblem, objective: str) -> None:
    expected = brute_force(problem, objective)
    solution = solve(problem, objective)
    if math.isinf(expected):
        assert solution is None
        return
    assert solution is not None
    assert solution.value == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # The reported plan really achieves that value and is well formed.
    bottleneck, latency = evaluate(problem, solution.segments)
    assert (bottleneck, latency) == pytest.approx((solution.bottleneck_ms, solution.latency_ms))
    assert solution.segments[0].start == 0 and solution.segments[-1].end == problem.n_units
    assert all(a.end == b.start for a, b in zip(solution.segments, solution.segments[1:]))
    assert len({s.device for s in solution.segments}) == len(solution.segments)
    if problem.stages is not None:
        assert len(solution.segments) == problem.stages


@settings(max_examples=120, deadline=None)
@given(problems())
def test_throughput_ties_go_to_the_lowest_latency(problem: PartitionProblem) -> None:
    """Among plans with the optimal bottleneck, the one returned has the least latency."""
    solution = solve(problem, THROUGHPUT)
    if solution is None:
        return
    bound = solution.bottleneck_ms * (1 + 1e-9) + 1e-12
    masked = PartitionProblem(
        np.where(problem.compute <= bound, problem.compute, math.inf),
        np.where(problem.transfer <= bound, problem.transfer, math.inf),
        np.where(problem.inbound <= bound, problem.inbound, math.inf),
        np.where(problem.outbound <= bound, problem.outbound, math.inf),
        stages=problem.stages,
    )
    assert solution.latency_ms == pytest.approx(brute_force(masked, LATENCY), rel=1e-9)


def _chain(
    unit_ms: list[list[float]], transfer_ms: float, memory_ok: bool = True
) -> PartitionProblem:
    d_count, n = len(unit_ms), len(unit_ms[0])
    compute = np.full((d_count, n + 1, n + 1), math.inf)
    for d in range(d_count):
        for j in range(n):
            for k in range(j + 1, n + 1):
                compute[d, j, k] = sum(unit_ms[d][j:k])
    transfer = np.full((d_count, d_count, n + 1), transfer_ms)
    for d in range(d_count):
        transfer[d, d] = 0
    return PartitionProblem(compute, transfer, np.zeros(d_count), np.zeros(d_count))


def test_deterministic_and_prefers_fewer_stages_on_ties() -> None:
    problem = _chain([[1.0, 1.0], [1.0, 1.0]], transfer_ms=0.0)
    # One device: bottleneck 2; two devices: bottleneck 1 (strictly better).
    assert solve(problem, THROUGHPUT).segments == (Segment(0, 0, 1), Segment(1, 1, 2))  # type: ignore[union-attr]
    # For latency the split gains nothing (free transfer, same sum): fewer stages win.
    assert solve(problem, LATENCY).segments == (Segment(0, 0, 2),)  # type: ignore[union-attr]
    runs = {solve(problem, THROUGHPUT).segments for _ in range(5)}  # type: ignore[union-attr]
    assert len(runs) == 1


def test_reports_best_value_per_stage_count() -> None:
    problem = _chain([[4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 4.0, 4.0]], transfer_ms=1.0)
    solution = solve(problem, THROUGHPUT)
    assert solution is not None
    assert solution.best_by_stages == {1: 16.0, 2: 8.0}

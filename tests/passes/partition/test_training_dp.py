"""The exact training partitioner equals brute-force enumeration on random instances,
memory that depends on the stage's place in the pipeline (1F1B) included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.passes.partition.dp import Segment
from lamc.passes.partition.training import TrainingProblem, brute_force, solve


@st.composite
def problems(draw: st.DrawFn) -> TrainingProblem:
    """1-9 units, 1-4 devices: random forward+backward costs, links (some missing),
    weights, activations and memories tight enough that placement matters."""
    n = draw(st.integers(1, 9))
    d_count = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    unit_ms = rng.uniform(0.1, 10.0, size=(d_count, n)) * rng.uniform(0.2, 5.0, size=(d_count, 1))
    prefix = np.concatenate([np.zeros((d_count, 1)), np.cumsum(unit_ms, axis=1)], axis=1)
    work = np.full((d_count, n + 1, n + 1), math.inf)
    upper = np.triu_indices(n + 1, k=1)
    overhead = rng.uniform(0, 1, size=d_count)
    for d in range(d_count):
        full = prefix[d][None, :] - prefix[d][:, None] + overhead[d]
        work[d][upper] = full[upper]
    link = np.zeros((d_count, d_count, n + 1))
    cut_bytes = rng.uniform(0, 5, size=n + 1)
    for a in range(d_count):
        for b in range(a + 1, d_count):
            one = math.inf if rng.uniform() < 0.15 else rng.uniform(0, 3)
            link[a, b] = link[b, a] = one + cut_bytes / rng.uniform(0.2, 5)
    params = rng.uniform(1, 10, size=n)
    saved = rng.uniform(0, 4, size=n)
    p = np.concatenate([[0.0], np.cumsum(params)])
    s = np.concatenate([[0.0], np.cumsum(saved)])
    segment = np.maximum(p[None, :] - p[:, None], 0)
    activations = np.maximum(s[None, :] - s[:, None], 0)
    micro_batches = draw(st.integers(1, 6))
    capacity = rng.uniform(0.3, 1.5, size=d_count) * (params.sum() + 2 * saved.sum())
    update = rng.uniform(0, 0.5) * np.stack([segment] * d_count)
    return TrainingProblem(
        work=work,
        link=link,
        base_memory=np.stack([segment] * d_count),
        activations=activations,
        capacity=capacity,
        update=update,
        micro_batches=micro_batches,
        gpipe=draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_equals_brute_force(problem: TrainingProblem) -> None:
    expected = brute_force(problem)
    solution = solve(problem)
    if expected is None:
        assert solution is None
        return
    assert solution is not None
    assert solution.step_ms == pytest.approx(expected.step_ms, rel=1e-9, abs=1e-12)
    # The plan achieves what it reports, and is a pipeline over distinct devices.
    again = problem.evaluate(solution.segments)
    assert again is not None and again.step_ms == pytest.approx(solution.step_ms)
    assert solution.segments[0].start == 0 and solution.segments[-1].end == problem.n_units
    assert all(a.end == b.start for a, b in zip(solution.segments, solution.segments[1:]))
    assert len({s.device for s in solution.segments}) == len(solution.segments)


def test_1f1b_fits_where_gpipe_does_not() -> None:
    """Two units, two equal devices, activations large: under GPipe each stage keeps all
    four micro-batches and nothing fits; under 1F1B the last stage keeps one and the
    first two, so the two-stage pipeline fits."""
    work = np.full((2, 3, 3), math.inf)
    for d in range(2):
        work[d, 0, 1] = work[d, 1, 2] = 1.0
        work[d, 0, 2] = 2.0
    base = np.zeros((2, 3, 3))
    activations = np.array([[0, 10, 20], [0, 0, 10], [0, 0, 0]], dtype=float)
    common = dict(
        work=work,
        link=np.zeros((2, 2, 3)),
        base_memory=base,
        activations=activations,
        capacity=np.array([25.0, 25.0]),
        update=np.zeros((2, 3, 3)),
        micro_batches=4,
    )
    assert solve(TrainingProblem(**common, gpipe=True)) is None  # type: ignore[arg-type]
    found = solve(TrainingProblem(**common, gpipe=False))  # type: ignore[arg-type]
    assert found is not None
    assert found.segments == (Segment(0, 0, 1), Segment(1, 1, 2))
    # fill 2 ms (one micro-batch through both stages), then 3 more behind the bottleneck
    assert found.step_ms == pytest.approx(2.0 + 3 * 1.0)

"""Replicated stages (hybrid pipeline parallelism): the search over ordered sequences of
disjoint device groups equals brute-force enumeration, reduces to the chain search when
groups of one device are all there is to gain, and to data parallelism's cost for one
group of every device; replicating the heavy stage on two fast devices beats a deeper
pipeline where it should."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.passes.partition import hybrid as hy
from lamc.passes.partition.training import TrainingProblem
from lamc.passes.partition.training import solve as solve_chain
from tests.passes.partition.test_training_dp import problems


def _hybrid(problem: TrainingProblem, seed: int) -> hy.HybridProblem:
    rng = np.random.default_rng(seed)
    n, d = problem.n_units, problem.n_devices
    t = np.concatenate([[0.0], np.cumsum(rng.uniform(0, 3, size=n))])
    trainable = np.maximum(t[None, :] - t[:, None], 0.0)
    latency = rng.uniform(0, 1, size=(d, d))
    per_byte = rng.uniform(0.05, 2, size=(d, d))
    return hy.HybridProblem(
        problem, trainable, (latency + latency.T) / 2, (per_byte + per_byte.T) / 2
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(0, 2**32 - 1))
def test_equals_brute_force(problem: TrainingProblem, seed: int) -> None:
    hybrid = _hybrid(problem, seed)
    expected = hy.brute_force(hybrid)
    solution = hy.solve(hybrid)
    if expected is None:
        assert solution is None
        return
    assert solution is not None
    assert solution.step_ms == pytest.approx(expected.step_ms, rel=1e-9, abs=1e-12)
    stages = tuple((sum(1 << e for e in s.members), s.start, s.end) for s in solution.stages)
    again = hybrid.evaluate(stages)
    assert again is not None and again.step_ms == pytest.approx(solution.step_ms)
    used = [e for s in solution.stages for e in s.members]
    assert len(used) == len(set(used))
    assert all(sum(s.shares) == problem.micro_batches for s in solution.stages)
    # Groups of one device are the chain's stages: never worse than the best chain under
    # GPipe's order (which a pipeline with replicated stages runs).
    chain = solve_chain(dataclasses.replace(problem, gpipe=True))
    if chain is not None:
        assert solution.step_ms <= chain.step_ms * (1 + 1e-9)


def _uniform(devices: list[float], units: int, m: int, memory: float = 1e9) -> TrainingProblem:
    """`units` equal units; device d takes devices[d] ms a unit a micro-batch; fast links."""
    d, n = len(devices), units
    work = np.full((d, n + 1, n + 1), math.inf)
    for k, per in enumerate(devices):
        for i in range(n + 1):
            for j in range(i + 1, n + 1):
                work[k, i, j] = per * (j - i)
    zeros = np.zeros((d, n + 1, n + 1))
    return TrainingProblem(
        work=work,
        link=np.full((d, d, n + 1), 0.01),
        base_memory=zeros,
        activations=np.zeros((n + 1, n + 1)),
        capacity=np.full(d, memory),
        update=zeros.copy(),
        micro_batches=m,
        gpipe=False,
    )


def _gradients(
    problem: TrainingProblem, per_unit: float, latency: float, per_byte: float
) -> hy.HybridProblem:
    """`problem` with `per_unit` trainable bytes a unit and uniform links."""
    n, d = problem.n_units, problem.n_devices
    t = np.concatenate([[0.0], np.cumsum(np.full(n, per_unit))])
    return hy.HybridProblem(
        problem,
        np.maximum(t[None, :] - t[:, None], 0.0),
        np.full((d, d), latency),
        np.full((d, d), per_byte),
    )


def test_the_heavy_stage_replicated_beats_a_deeper_pipeline() -> None:
    """Two fast devices and a slow one, 8 micro-batches: the best chain cannot split 6
    units evenly between speeds 1, 1 and 4; two fast devices sharing every micro-batch
    (pure data parallelism with a small all-reduce) or with the slow one as a short
    stage beats it, and the plan says which members take how many micro-batches."""
    problem = _uniform([1.0, 1.0, 4.0], units=6, m=8)
    hybrid = _gradients(problem, per_unit=0.1, latency=0.05, per_byte=0.01)
    solution = hy.solve(hybrid)
    chain = solve_chain(problem)
    assert solution is not None and chain is not None
    assert solution.replicated and solution.step_ms < chain.step_ms * 0.95
    replicated = next(s for s in solution.stages if len(s.members) > 1)
    assert {0, 1} <= set(replicated.members)
    assert hy.brute_force(hybrid) is not None
    assert solution.step_ms == pytest.approx(hy.brute_force(hybrid).step_ms)  # type: ignore[union-attr]


def test_replication_is_not_chosen_when_gradients_are_heavy_and_links_slow() -> None:
    """Full training over a slow link: the all-reduce of a stage's whole gradient costs
    more than splitting its micro-batches saves, and the plan stays a chain."""
    problem = _uniform([1.0, 1.0], units=4, m=4)
    hybrid = _gradients(problem, per_unit=1e4, latency=0.1, per_byte=1.0)
    solution = hy.solve(hybrid)
    chain = solve_chain(problem)
    assert solution is not None and chain is not None
    assert not solution.replicated
    assert solution.step_ms == pytest.approx(chain.step_ms)


def test_more_devices_than_the_search_takes_are_refused() -> None:
    problem = _uniform([1.0] * (hy.MAX_DEVICES + 1), units=2, m=2)
    d = problem.n_devices
    hybrid = hy.HybridProblem(problem, np.zeros((3, 3)), np.zeros((d, d)), np.zeros((d, d)))
    with pytest.raises(ValueError, match=f"at most {hy.MAX_DEVICES} devices"):
        hy.solve(hybrid)


def test_the_search_runs_within_its_budget_only() -> None:
    assert hy.searchable(4, 12) and hy.searchable(3, 25) and hy.searchable(2, 51)
    assert not hy.searchable(4, 24) and not hy.searchable(hy.MAX_DEVICES + 1, 1)

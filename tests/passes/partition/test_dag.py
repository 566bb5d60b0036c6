"""Branch-parallel (fork-join) plans: the exact search agrees with brute force on small
random instances, for both objectives."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lamc.passes.partition.dag import Chain, DagProblem, evaluate_dag, solve_dag
from lamc.passes.partition.dp import LATENCY, THROUGHPUT, Segment


def _chain(rng: np.random.Generator, d: int, n: int, *, main: bool, holes: float) -> Chain:
    unit = rng.uniform(1.0, 10.0, size=(d, n))
    compute = np.full((d, n + 1, n + 1), math.inf)
    for dev in range(d):
        for j in range(n):
            for k in range(j + 1, n + 1):
                compute[dev, j, k] = unit[dev, j:k].sum() + rng.uniform(0.0, 1.0)
    # Some stages do not fit (memory), some links do not exist.
    compute[rng.random(compute.shape) < holes] = math.inf
    transfer = rng.uniform(0.5, 8.0, size=(d, d, n + 1))
    transfer[rng.random(transfer.shape) < holes / 2] = math.inf
    for dev in range(d):
        transfer[dev, dev, :] = 0.0
    inbound = rng.uniform(0.0, 6.0, size=d)
    outbound = rng.uniform(0.0, 3.0, size=d) if main else None
    return Chain(compute, transfer, inbound, outbound)


def _instance(seed: int, devices: int, branches: int, holes: float = 0.1) -> DagProblem:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, size=branches)
    parts = [_chain(rng, devices, int(n), main=False, holes=holes) for n in sizes]
    mains = {}
    for size in range(1, branches + 1):
        for own in itertools.combinations(range(branches), size):
            absorbed = sum(int(sizes[b]) for b in range(branches) if b not in own)
            n = absorbed + int(rng.integers(1, 3))
            mains[frozenset(own)] = _chain(rng, devices, n, main=True, holes=holes)
    return DagProblem(parts, mains)


def _chains(n: int, devices: list[int]) -> list[tuple[Segment, ...]]:
    """Every chain of n units over an ordered selection of `devices` (each at most once)."""
    found = []
    for count in range(1, min(n, len(devices)) + 1):
        for order in itertools.permutations(devices, count):
            for cuts in itertools.combinations(range(1, n), count - 1):
                bounds = (0, *cuts, n)
                found.append(
                    tuple(Segment(order[i], bounds[i], bounds[i + 1]) for i in range(count))
                )
    return found


def _brute(problem: DagProblem, objective: str) -> tuple[float, float]:
    """The best (bottleneck, latency) over every fork-join plan, by enumeration."""
    d = problem.n_devices
    best = (math.inf, math.inf)
    key = (lambda bl: bl) if objective == THROUGHPUT else (lambda bl: (bl[1], bl[0]))
    for own_set, main in problem.mains.items():
        own = tuple(sorted(own_set))
        for main_plan in _chains(main.n, list(range(d))):
            used = {s.device for s in main_plan}

            def arms(
                k: int,
                taken: set[int],
                chosen: list[tuple[Segment, ...]],
                *,
                _own=own,
                _mp=main_plan,
            ) -> None:
                nonlocal best
                if k == len(_own):
                    value = evaluate_dag(problem, _own, tuple(chosen), _mp)
                    if key(value) < key(best):
                        best = value
                    return
                branch = problem.branches[_own[k]]
                free = [x for x in range(d) if x not in taken]
                for plan in _chains(branch.n, free):
                    arms(k + 1, taken | {s.device for s in plan}, [*chosen, plan])

            arms(0, used, [])
    return best


CASES = [
    (seed, devices, branches)
    for seed in range(10)
    for devices, branches in ((3, 2), (4, 2), (4, 3))
]


@pytest.mark.parametrize(("seed", "devices", "branches"), CASES)
def test_exact_search_agrees_with_brute_force(seed: int, devices: int, branches: int) -> None:
    problem = _instance(seed, devices, branches)
    for objective in (THROUGHPUT, LATENCY):
        found = solve_dag(problem, objective)
        want = _brute(problem, objective)
        if not math.isfinite(want[0]):
            assert found is None
            continue
        assert found is not None
        # The solution's own figures are its plan's, evaluated from the definition.
        assert (found.bottleneck_ms, found.latency_ms) == pytest.approx(
            evaluate_dag(problem, found.own, found.branches, found.main)
        )
        if objective == THROUGHPUT:
            assert found.bottleneck_ms == pytest.approx(want[0], rel=1e-9)
            assert found.latency_ms == pytest.approx(want[1], rel=1e-9)  # ties: lowest latency
        else:
            assert found.latency_ms == pytest.approx(want[1], rel=1e-9)


def test_evaluate_refuses_a_device_used_twice() -> None:
    problem = _instance(0, 3, 2, holes=0.0)
    own = (0, 1)
    arms = tuple((Segment(0, 0, problem.branches[b].n),) for b in own)
    main = (Segment(2, 0, problem.mains[frozenset(own)].n),)
    assert math.isinf(evaluate_dag(problem, own, arms, main)[0])
    fine = ((Segment(0, 0, problem.branches[0].n),), (Segment(1, 0, problem.branches[1].n),))
    assert math.isfinite(evaluate_dag(problem, own, fine, main)[0])


def test_branches_run_side_by_side_in_latency() -> None:
    """Two branches of 10 ms each on two devices, joined on a third: the latency is one
    branch plus the join, not both branches."""
    inf = math.inf
    d = 3

    def one_unit(ms: list[float], outbound: bool) -> Chain:
        compute = np.full((d, 2, 2), inf)
        compute[:, 0, 1] = ms
        transfer = np.zeros((d, d, 2))
        return Chain(compute, transfer, np.zeros(d), np.zeros(d) if outbound else None)

    branch = one_unit([10.0, 10.0, 10.0], outbound=False)
    problem = DagProblem(
        [branch, branch],
        {
            frozenset({0, 1}): one_unit([1.0, 1.0, 1.0], True),
            frozenset({0}): one_unit([inf, inf, 11.0], True),
            frozenset({1}): one_unit([inf, inf, 11.0], True),
        },
    )
    found = solve_dag(problem, LATENCY)
    assert found is not None
    assert found.own == (0, 1)
    assert found.latency_ms == pytest.approx(11.0)
    assert len(set(found.devices)) == 3

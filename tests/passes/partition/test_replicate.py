"""Replicated stages for inference (`--replicate`): the search equals brute-force
enumeration, is never worse than the chain search, keeps incompatible devices apart, and
the planner takes a replicated plan only where it beats the chain; requests are spread
round-robin by the plan's shares."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.passes.partition import replicate as rep
from lamc.passes.partition.dp import THROUGHPUT, PartitionProblem
from lamc.passes.partition.dp import solve as solve_chain
from lamc.passes.partition.planner import PlanRequest, plan
from lamc.runtime.spread import Spread
from lamc.topology import Constraints, load_topology
from tests.conftest import analysed_model
from tests.passes.partition.test_dp import problems

TWO_BOARDS = Path(__file__).parent.parent.parent / "data" / "two-boards-two-pcs.yaml"


def _first_units(problem: PartitionProblem, units: int) -> PartitionProblem:
    m = min(units, problem.n_units)
    return PartitionProblem(
        problem.compute[:, : m + 1, : m + 1],
        problem.transfer[:, :, : m + 1],
        problem.inbound,
        problem.outbound,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(1, 6))
def test_equals_brute_force_and_never_loses_to_the_chain(
    problem: PartitionProblem, units: int
) -> None:
    problem = _first_units(problem, units)
    rp = rep.ReplicatedProblem(problem)
    expected = rep.brute_force(rp)
    solution = rep.solve(rp)
    if expected is None:
        assert solution is None
        return
    assert solution is not None
    assert solution.bottleneck_ms == pytest.approx(expected.bottleneck_ms, rel=1e-9, abs=1e-12)
    assert solution.latency_ms == pytest.approx(expected.latency_ms, rel=1e-7, abs=1e-9)
    stages = tuple((sum(1 << e for e in s.members), s.start, s.end) for s in solution.stages)
    again = rp.evaluate(stages)
    assert again is not None and again.bottleneck_ms == pytest.approx(solution.bottleneck_ms)
    used = [e for s in solution.stages for e in s.members]
    assert len(used) == len(set(used))
    assert all(sum(s.shares) == pytest.approx(1.0) for s in solution.stages)
    # Shares follow speed: a member's busy time per request is the same for all of them.
    for s in solution.stages:
        busy = [w * c for w, c in zip(s.shares, s.compute_ms, strict=True)]
        assert busy == pytest.approx([s.period_ms] * len(busy))
    chain = solve_chain(problem, THROUGHPUT)
    if chain is not None:
        assert solution.bottleneck_ms <= chain.bottleneck_ms * (1 + 1e-9)


def _uniform(speeds: list[float], units: int, link_ms: float) -> PartitionProblem:
    """`units` equal units of 1 ms at speed 1; every link `link_ms` at every cut."""
    d = len(speeds)
    compute = np.full((d, units + 1, units + 1), math.inf)
    for e, speed in enumerate(speeds):
        for i in range(units):
            for j in range(i + 1, units + 1):
                compute[e, i, j] = (j - i) / speed
    transfer = np.full((d, d, units + 1), link_ms)
    return PartitionProblem(compute, transfer, np.zeros(d), np.zeros(d))


def test_equal_devices_share_one_stage_when_links_cost_more_than_they_save() -> None:
    # Four equal devices, 8 units of 1 ms, slow links (3 ms): a pipeline is bound by its
    # links, four replicas of the whole model are not (8 / 4 = 2 ms a request).
    solution = rep.solve(rep.ReplicatedProblem(_uniform([1, 1, 1, 1], 8, 3.0)))
    assert solution is not None
    assert [s.members for s in solution.stages] == [(0, 1, 2, 3)]
    assert solution.bottleneck_ms == pytest.approx(2.0)
    assert solution.stages[0].shares == pytest.approx((0.25,) * 4)
    chain = solve_chain(_uniform([1, 1, 1, 1], 8, 3.0), THROUGHPUT)
    assert chain is not None and chain.bottleneck_ms == pytest.approx(3.0)


def test_shares_follow_speed_and_incompatible_devices_stay_apart() -> None:
    problem = _uniform([3, 1, 1], 6, 0.1)
    together = rep.solve(rep.ReplicatedProblem(problem))
    assert together is not None and together.stages[0].members == (0, 1, 2)
    assert together.stages[0].shares == pytest.approx((0.6, 0.2, 0.2))
    # Device 0 may not share a stage with the others (another kind of device).
    apart = rep.solve(rep.ReplicatedProblem(problem, lambda a, b: 0 not in (a, b)))
    assert apart is not None
    assert all(0 not in s.members or s.members == (0,) for s in apart.stages)
    assert apart.bottleneck_ms >= together.bottleneck_ms


def test_a_member_that_cannot_hold_the_stage_is_left_out() -> None:
    problem = _uniform([1, 1], 4, 10.0)
    problem.compute[1, 0, 4] = math.inf  # device 1 cannot hold the whole model
    solution = rep.solve(rep.ReplicatedProblem(problem))
    assert solution is not None
    for s in solution.stages:
        if s.members == (0, 1):
            assert (s.start, s.end) != (0, 4)


def test_search_limits() -> None:
    assert rep.searchable(4, 41) and rep.searchable(5, 25) and rep.searchable(3, 60)
    assert not rep.searchable(6, 2) and not rep.searchable(4, 42) and not rep.searchable(5, 26)
    with pytest.raises(ValueError, match="at most 5 devices"):
        rep.solve(rep.ReplicatedProblem(_uniform([1] * 6, 2, 1.0)))


def test_the_planner_replicates_the_stage_a_chain_cannot_widen() -> None:
    topology = load_topology(TWO_BOARDS)
    workload = analysed_model("zoo:gpt2:test").workload
    chain, _ = plan(workload, topology, PlanRequest())
    best, _ = plan(workload, topology, PlanRequest(replicate="auto", compare=True))
    assert best.replicated and not chain.replicated
    assert best.bottleneck_ms < chain.bottleneck_ms
    middle = [s for s in best.stages if s.replicas]
    assert len(middle) == 1 and set(middle[0].devices) == {"pc-a", "pc-b"}
    assert sum(r.share for r in middle[0].replicas) == pytest.approx(1.0)
    assert "|" in best.text and any("round-robin by speed" in n for n in best.notes)
    assert any(a.name == "chain" for a in best.alternatives)
    # Constraints keep one device a stage, and the plan says why.
    pinned, _ = plan(
        workload, topology, PlanRequest(replicate="auto", constraints=Constraints(stages=3))
    )
    assert not pinned.replicated
    assert any("not searched with constraints" in n for n in pinned.notes)
    # Replicas do not shorten one request: objective latency keeps a chain, and says why.
    fastest, _ = plan(workload, topology, PlanRequest(replicate="auto", objective="latency"))
    assert not fastest.replicated
    assert any("objective latency (replicas raise throughput only)" in n for n in fastest.notes)


def test_spread_keeps_every_member_within_one_request_of_its_share() -> None:
    spread = Spread([2, 1, 1])
    picks = [spread.pick() for _ in range(101)]
    for n in range(1, 102):
        for k, share in enumerate((0.5, 0.25, 0.25)):
            assert abs(picks[:n].count(k) - n * share) <= 1.0
    assert picks[:4] == [0, 1, 2, 0]
    with pytest.raises(ValueError):
        Spread([1, 0])


def test_the_front_of_a_replicated_first_stage_hands_each_call_on_by_share() -> None:
    from lamc.runtime.ray_serve import Front

    class Handle:
        def __init__(self) -> None:
            self.payloads: list[object] = []

        def remote(self, payload: object) -> asyncio.Future[object]:
            self.payloads.append(payload)
            future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            future.set_result(("answer", payload))
            return future

    a, b = Handle(), Handle()
    front = Front([[a, 0.75], [b, 0.25]])

    async def calls() -> list[object]:
        return [await front(k) for k in range(8)]

    answers = asyncio.run(calls())
    assert answers == [("answer", k) for k in range(8)]
    assert len(a.payloads) == 6 and len(b.payloads) == 2


def test_tensorrt_devices_share_a_stage_only_with_alike_gpus() -> None:
    """A TensorRT engine is built for one GPU: two Orins may serve a stage together, an
    Orin and an L4 may not; with CUDA's ONNX Runtime (one portable model) they may."""
    import dataclasses

    path = Path(__file__).parent.parent.parent.parent / "examples/topologies/agx-orin-l4-10gbe.yaml"
    topology = load_topology(path)
    workload = analysed_model("zoo:gpt2:test").workload
    best, _ = plan(workload, topology, PlanRequest(replicate="auto"))
    groups = [set(s.devices) for s in best.stages if s.replicas]
    assert groups == [{"orin-a", "orin-b"}], best.text
    cuda = dataclasses.replace(
        topology,
        devices=tuple(
            dataclasses.replace(d, backends=("onnxruntime-cuda", "onnxruntime"))
            for d in topology.devices
        ),
    )
    portable, _ = plan(workload, cuda, PlanRequest(replicate="auto"))
    assert [set(s.devices) for s in portable.stages] == [{"orin-a", "orin-b", "l4"}]

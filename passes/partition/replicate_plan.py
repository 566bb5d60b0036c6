"""A plan with replicated stages (see `replicate`) as a `Plan`: each stage's members,
their shares of the requests, and the group's periods."""

from __future__ import annotations

from dataclasses import replace

from lamc.cost import CostModel
from lamc.passes.partition.dp import Segment, Solution
from lamc.passes.partition.replicate import ReplicatedSolution
from lamc.plan import Plan, Replica


def as_solution(found: ReplicatedSolution, objective: str) -> Solution:
    """The chain of each group's first member: what `to_plan` makes a `Plan` of."""
    segments = tuple(Segment(s.members[0], s.start, s.end) for s in found.stages)
    return Solution(objective, segments, found.bottleneck_ms, found.latency_ms)


def as_plan(base: Plan, found: ReplicatedSolution, cost: CostModel, chain: Plan) -> Plan:
    """`base` (`to_plan` of `as_solution(found)`) with each group's members, shares and
    periods."""
    stages = []
    for planned, group in zip(base.stages, found.stages, strict=True):
        replicas: tuple[Replica, ...] = ()
        if len(group.members) > 1:
            replicas = tuple(
                Replica(
                    device=cost.devices[e].name,
                    host=cost.devices[e].host,
                    share=share,
                    compute_ms=ms,
                    memory_bytes=cost.memory(e, group.start, group.end).total,
                    capacity_bytes=cost.memory(e, group.start, group.end).capacity,
                )
                for e, share, ms in zip(group.members, group.shares, group.compute_ms, strict=True)
            )
        stages.append(
            replace(
                planned,
                compute_ms=group.period_ms,
                transfer_ms=group.link_ms,
                replicas=replicas,
            )
        )
    return replace(
        base,
        stages=tuple(stages),
        inbound_ms=found.inbound_ms,
        fluid_bound_ms=chain.fluid_bound_ms,
        best_by_stages={},
        budgets=chain.budgets,
        search="exact over groups of devices (round-robin by speed)",
    )

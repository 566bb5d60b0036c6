"""Failover plans, made at compile time: for every device (or every pair, `--failover 2`)
the best plan of the same model without it, under the same constraints and budgets, so a
pipeline that loses a device can switch to a plan already made instead of waiting for a
person to recompile.

The stage count asked for (`--stages`, `constraints.stages`) names a pipeline over the
whole topology; a failover plan chooses its own. A device the primary plan does not use
changes nothing: its failover plan is the primary plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from lamc.compiler.analysis import Analysed
from lamc.compiler.planning import plan_model, prepare_request
from lamc.errors import LamcError, UsageError
from lamc.manifest import FailoverPlan, PlanSummary
from lamc.passes.partition.planner import PlanRequest
from lamc.plan import Plan
from lamc.topology import Topology
from lamc.topology.constraints import Constraints

# Plans made at most (the pairs of 90 devices): each is a full partitioner run.
MAX_FAILOVER_PLANS = 4096


def default_depth(topology: Topology) -> int:
    """`--failover` unset: one lost device is planned for when there are 3+ devices."""
    return 1 if len(topology.devices) >= 3 else 0


def lost_sets(topology: Topology, depth: int) -> list[tuple[str, ...]]:
    """Every set of up to `depth` devices, singles first, in the topology's order."""
    names = topology.names()
    sets: list[tuple[str, ...]] = []
    for k in range(1, min(depth, len(names)) + 1):
        sets.extend(itertools.combinations(names, k))
    return sets


@dataclass(frozen=True)
class Planned:
    """One failover case as planned: the lost devices and the plan (the primary's when
    they were idle), or the reason there is none."""

    lost: tuple[str, ...]
    plan: Plan | None
    reason: str = ""

    def entry(self) -> FailoverPlan:
        summary = PlanSummary.of(self.plan) if self.plan is not None else None
        return FailoverPlan(self.lost, summary, self.reason)


def failover_plans(
    analysed: Analysed,
    topology: Topology,
    primary: Plan,
    request: PlanRequest | None,
    depth: int,
    *,
    compress: str | None = None,
    backend: str = "auto",
) -> tuple[FailoverPlan, ...]:
    """The plan without each set of up to `depth` devices, or why there is none."""
    return tuple(
        p.entry()
        for p in plan_failovers(
            analysed, topology, primary, request, depth, compress=compress, backend=backend
        )
    )


def plan_failovers(
    analysed: Analysed,
    topology: Topology,
    primary: Plan,
    request: PlanRequest | None,
    depth: int,
    *,
    compress: str | None = None,
    backend: str = "auto",
) -> list[Planned]:
    """Each failover case with its full plan (what the compiler builds stages for).
    Failover plans are chains (what the failover runtime switches between); a
    branch-parallel primary gets none, nor one with replicated stages (Ray Serve, which
    serves it, replaces a lost replica itself)."""
    if depth <= 0 or primary.is_dag or primary.replicated:
        return []
    sets = lost_sets(topology, depth)
    if len(sets) > MAX_FAILOVER_PLANS:
        raise UsageError(
            f"--failover {depth} over {len(topology.devices)} devices asks for {len(sets)} "
            f"plans (at most {MAX_FAILOVER_PLANS})",
            hint="use --failover 1",
        )
    used = {s.device for s in primary.stages}
    # Resolved once (a decoder's decode-step workload is not made again for every plan).
    request = replace(
        prepare_request(request or PlanRequest(), analysed), branches="off", replicate="off"
    )
    found: list[Planned] = []
    for lost in sets:
        if not used & set(lost):
            found.append(Planned(lost, primary))
            continue
        found.append(_without(analysed, topology, lost, request, compress, backend))
    return found


def _without(
    analysed: Analysed,
    topology: Topology,
    lost: tuple[str, ...],
    request: PlanRequest,
    compress: str | None,
    backend: str,
) -> Planned:
    remaining = topology.without(set(lost))
    if not remaining.devices:
        return Planned(lost, None, "no device is left")
    pinned = [
        f"pin {unit}={device}"
        for c in (topology.constraints, request.constraints)
        if c is not None
        for unit, device in c.pin.items()
        if device in lost
    ]
    if pinned:
        return Planned(lost, None, f"{', '.join(pinned)}: pinned to a lost device")
    remaining = replace(remaining, constraints=_without_devices(remaining.constraints, lost))
    if request.constraints is not None:
        request = replace(request, constraints=_without_devices(request.constraints, lost))
    try:
        plan, _ = plan_model(analysed, remaining, request, compress=compress, backend=backend)
    except LamcError as exc:
        return Planned(lost, None, exc.message)
    if not plan.budgets_ok:
        broken = "; ".join(
            f"{b.name} {b.value:.4g} vs limit {b.limit:g} {b.unit}"
            for b in plan.budgets
            if not b.ok
        )
        return Planned(lost, None, f"the best plan breaks a budget: {broken}")
    return Planned(lost, plan)


def _without_devices(constraints: Constraints, lost: tuple[str, ...]) -> Constraints:
    """The constraints of a failover plan: no stage count, and nothing more to say of the
    lost devices (excluding or forbidding a device that is gone holds anyway)."""
    forbid = {
        unit: tuple(d for d in devices if d not in lost)
        for unit, devices in constraints.forbid.items()
    }
    return replace(
        constraints,
        stages=None,
        exclude=tuple(d for d in constraints.exclude if d not in lost),
        forbid={unit: devices for unit, devices in forbid.items() if devices},
    )

"""From a model with branches to the best branch-parallel plan (see `dag`), as a `Plan`
whose stages say what they receive from and send to."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lamc.cost import CostModel
from lamc.passes.partition.branches import ForkJoin, fork_join, handed, inputs_read, part
from lamc.passes.partition.dag import MAX_DEVICES, Chain, DagProblem, DagSolution, solve_dag
from lamc.passes.partition.dp import Segment
from lamc.plan import Plan, StagePlan
from lamc.topology import Topology
from lamc.workload import Workload


@dataclass
class _Parts:
    shape: ForkJoin
    branch_costs: list[CostModel]
    main_costs: dict[frozenset[int], CostModel]
    main_units: dict[frozenset[int], tuple[int, ...]]
    main_inputs: dict[frozenset[int], tuple[str, ...]]
    problem: DagProblem


def why_not_dag(workload: Workload, topology: Topology) -> str | None:
    """Why the model is not planned branch-parallel on this topology (None: it may be)."""
    if fork_join(workload) is None:
        return "the model is one chain: no unit reads two independent branches"
    if len(topology.devices) > MAX_DEVICES:
        return f"branch-parallel plans are searched on up to {MAX_DEVICES} devices"
    return None


def _parts(workload: Workload, topology: Topology, codec: str) -> _Parts | None:
    shape = fork_join(workload)
    if shape is None:
        return None
    capacity = np.array([d.memory_bytes for d in topology.devices])[:, None, None]

    def chain(cost: CostModel, inbound: np.ndarray, outbound: np.ndarray | None) -> Chain:
        fits = cost.memory_table() <= capacity
        compute = np.where(fits, cost.compute_table(), math.inf)
        return Chain(compute, cost.transfer_table(), inbound, outbound)

    devices = range(len(topology.devices))
    branches, branch_costs = [], []
    for b, units in enumerate(shape.branches):
        cost = CostModel(part(workload, units, name=f"branch{b}"), topology, codec=codec)
        branch_costs.append(cost)
        inbound = np.array([cost.client_ms(d, 0, inbound=True) for d in devices])
        branches.append(chain(cost, inbound, None))
    mains: dict[frozenset[int], Chain] = {}
    main_costs, main_units, main_inputs = {}, {}, {}
    for mask in range(1, 1 << len(shape.branches)):
        own = frozenset(b for b in range(len(shape.branches)) if mask >> b & 1)
        units = shape.main_units(own)
        arriving = {t for b in own for t in handed(workload, shape.branches[b])}
        cost = CostModel(
            part(workload, units, arriving=arriving, hands_on=False, name="main"),
            topology,
            codec=codec,
        )
        names = inputs_read(workload, units)
        inbound = np.array([cost.inputs_ms(d, names) for d in devices])
        outbound = np.array([cost.client_ms(d, cost.n, inbound=False) for d in devices])
        mains[own] = chain(cost, inbound, outbound)
        main_costs[own], main_units[own], main_inputs[own] = cost, units, names
    return _Parts(
        shape, branch_costs, main_costs, main_units, main_inputs, DagProblem(branches, mains)
    )


def best_dag(
    workload: Workload, topology: Topology, objective: str, codec: str = "raw"
) -> Plan | None:
    """The best branch-parallel plan with at least one branch on stages of its own (None:
    the model has no branches, or no such plan fits)."""
    if why_not_dag(workload, topology) is not None:
        return None
    parts = _parts(workload, topology, codec)
    if parts is None:
        return None
    solution = solve_dag(parts.problem, objective)
    if solution is None:
        return None
    return _to_plan(workload, topology, parts, solution, objective, codec)


def _to_plan(
    workload: Workload,
    topology: Topology,
    parts: _Parts,
    solution: DagSolution,
    objective: str,
    codec: str,
) -> Plan:
    own = frozenset(solution.own)
    stages: list[StagePlan] = []
    ends: list[int] = []  # each own branch's last stage
    join_index = sum(len(segs) for segs in solution.branches)
    join_device = solution.main[0].device
    inbound_ms, inbound_bytes = 0.0, 0.0

    def stage(
        cost: CostModel,
        units: tuple[int, ...],
        seg: Segment,
        after: tuple[int, ...],
        to: int | None,
        to_device: int | None,
    ) -> StagePlan:
        device = cost.devices[seg.device]
        mem = cost.memory(seg.device, seg.start, seg.end)
        if to_device is not None:
            nbytes = float(cost.link_bytes[seg.end])
            transfer = cost.transfer_ms(seg.device, to_device, seg.end)
            route = topology.best_route(device.name, cost.devices[to_device].name, nbytes)
            hops = tuple(f"{h.a}->{h.b}" for h in route.hops) if route else ()
        else:
            transfer = cost.client_ms(seg.device, cost.n, inbound=False)
            nbytes = float(cost.cut_bytes[cost.n]) if topology.client else 0.0
            hops = ()
        chosen = units[seg.start : seg.end]
        return StagePlan(
            index=len(stages),
            device=device.name,
            host=device.host,
            kind=device.kind,
            backend=device.backends[0],
            start_unit=min(chosen),
            end_unit=max(chosen) + 1,
            units=tuple(workload.units[u].name for u in chosen),
            params_bytes=mem.params,
            activation_bytes=mem.activations,
            kv_bytes=mem.kv_cache,
            runtime_bytes=mem.runtime,
            memory_bytes=mem.total,
            capacity_bytes=mem.capacity,
            compute_ms=cost.compute_ms(seg.device, seg.start, seg.end),
            transfer_ms=float(transfer),
            transfer_bytes=nbytes,
            route=hops,
            codec=codec if to_device is not None else "raw",
            unit_indices=tuple(chosen),
            after=after,
            to=to,
        )

    for b, segs in zip(solution.own, solution.branches):
        cost = parts.branch_costs[b]
        units = parts.shape.branches[b]
        first = segs[0].device
        inbound_ms = max(inbound_ms, cost.client_ms(first, 0, inbound=True))
        inbound_bytes += cost.inbound_bytes(first)
        for i, seg in enumerate(segs):
            last = i + 1 == len(segs)
            after: tuple[int, ...] = () if i == 0 else (len(stages) - 1,)
            to: int | None = join_index if last else len(stages) + 1
            nxt: int | None = join_device if last else segs[i + 1].device
            stages.append(stage(cost, units, seg, after, to, nxt))
        ends.append(len(stages) - 1)
    cost = parts.main_costs[own]
    units = parts.main_units[own]
    names = parts.main_inputs[own]
    inbound_ms = max(inbound_ms, cost.inputs_ms(join_device, names))
    inbound_bytes += cost.inputs_bytes(join_device, names)
    for i, seg in enumerate(solution.main):
        last = i + 1 == len(solution.main)
        after = tuple(ends) if i == 0 else (len(stages) - 1,)
        to = None if last else len(stages) + 1
        nxt = None if last else solution.main[i + 1].device
        stages.append(stage(cost, units, seg, after, to, nxt))
    return Plan(
        model=workload.name,
        topology=topology.name,
        objective=objective,
        binding=dict(sorted(workload.binding.items())),
        stages=tuple(stages),
        bottleneck_ms=solution.bottleneck_ms,
        latency_ms=solution.latency_ms,
        inbound_ms=inbound_ms,
        inbound_bytes=inbound_bytes,
        fluid_bound_ms=math.inf,
        search="exact (branch-parallel: fork-join plans)",
        join=join_index,
    )


def inputs_moved(plan: Plan, workload: Workload, topology: Topology) -> float:
    """Bytes of model input a plan moves over links to reach the stages that take it,
    with the inputs where `topology` says they originate: what a plan made without
    knowing that really moves."""
    cost = CostModel(workload, topology)
    names = [d.name for d in topology.devices]
    if not plan.is_dag:
        return cost.inbound_bytes(names.index(plan.stages[0].device))
    total = 0.0
    for stage in plan.stages:
        if stage.after == () or stage.index == plan.join:
            # The inputs this stage's chain reads enter here.
            units: list[int] = []
            k: int | None = stage.index
            while k is not None:
                units.extend(plan.stages[k].unit_set)
                nxt = plan.stages[k].to
                k = nxt if nxt is not None and nxt != plan.join else None
            reads = inputs_read(workload, units)
            total += cost.inputs_bytes(names.index(stage.device), reads)
    return total

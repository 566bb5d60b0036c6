"""Compression chosen per stage jointly with the cut points: per device and stage, the
fastest allowed method that fits, so the partitioner stays exact over all of them."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from lamc.cost import CostModel
from lamc.passes.compress.registry import METHODS, PRECISION_ORDER
from lamc.passes.partition.dp import Solution
from lamc.passes.partition.generation import Generation
from lamc.plan import Plan
from lamc.quantity import format_bytes
from lamc.topology import Topology
from lamc.workload import Workload


def with_methods(
    workload: Workload,
    topology: Topology,
    methods: dict[str, tuple[str, ...]],
    fp32: CostModel,
    capacity: np.ndarray,
    step: Generation | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, CostModel], list[str]]:
    """Per device and stage [j, k), the best allowed compression method that fits: its
    compute time and memory, and which one it is (an index into the sorted methods).

    A stage's method changes only its own time and memory (its inputs and outputs stay in
    the manifest's dtypes), so choosing it per entry of the cost tables keeps the
    partitioner exact over cut points, devices and methods together."""
    names = [d.name for d in fp32.devices]
    wanted = sorted(
        {m for d in names for m in methods.get(d, ("fp32",))}, key=PRECISION_ORDER.index
    )
    costs = {m: fp32.with_method(METHODS[m].cost) for m in wanted}
    shape = fp32.compute_table().shape
    best = np.full(shape, math.inf)
    best_memory = np.full(shape, math.inf)
    smallest = np.full(shape, math.inf)
    choice = np.full(shape, -1, dtype=np.int64)
    for index, m in enumerate(wanted):
        allowed = np.array([m in methods.get(d, ("fp32",)) for d in names])[:, None, None]
        compute_m = (
            step.compute(costs[m], step.decode.with_method(METHODS[m].cost))
            if step is not None
            else costs[m].compute_table()
        )
        memory_m = costs[m].memory_table()
        smallest = np.where(allowed, np.minimum(smallest, memory_m), smallest)
        ok = allowed & (memory_m <= capacity)
        # Strictly faster wins; ties keep the more precise method (earlier in the order).
        better = ok & (compute_m < best * (1 - 1e-9))
        best = np.where(better, compute_m, best)
        best_memory = np.where(better, memory_m, best_memory)
        choice = np.where(better, index, choice)
    fits = choice >= 0
    memory = np.where(fits, best_memory, smallest)
    compute = np.where(fits, best, step.compute(fp32) if step else fp32.compute_table())
    choice = np.where(fits, choice, 0)
    return compute, memory, fits, choice, costs, wanted


def set_precisions(
    plan_: Plan,
    solution: Solution,
    choice: np.ndarray,
    names: list[str],
    costs: dict[str, CostModel],
    methods: dict[str, tuple[str, ...]],
) -> Plan:
    """Each stage's method, with its memory and time, and why it was chosen."""
    stages = []
    for stage, seg in zip(plan_.stages, solution.segments, strict=True):
        method = names[int(choice[seg.device, seg.start, seg.end])]
        cost = costs[method]
        mem = cost.memory(seg.device, seg.start, seg.end)
        options = methods.get(stage.device, ("fp32",))
        fits = [
            m
            for m in options
            if costs[m].memory(seg.device, seg.start, seg.end).total <= mem.capacity
        ]
        if len(options) == 1:
            reason = "as asked"
        elif method == "fp32":
            reason = "fp32 fits and no allowed method is faster here"
        else:
            too_big = [m for m in options if m not in fits]
            reason = f"fastest of {', '.join(fits)} that fit" + (
                f" ({', '.join(too_big)} would not fit in {format_bytes(mem.capacity)})"
                if too_big
                else ""
            )
        stages.append(
            replace(
                stage,
                precision=method,
                precision_reason=reason,
                params_bytes=mem.params,
                memory_bytes=mem.total,
                compute_ms=cost.compute_ms(seg.device, seg.start, seg.end),
            )
        )
    return replace(plan_, stages=tuple(stages))

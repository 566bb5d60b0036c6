"""What other tools would do, evaluated under lamc's cost model (for comparison only).

- equal: the same number of units on every device, in declared order
  (torch.distributed.pipelining's even split);
- memory: units in proportion to each device's memory (exo, llama.cpp RPC);
- single: the whole model on the one device that runs it fastest.
"""

from __future__ import annotations

import math

import numpy as np

from lamc.cost import CostModel
from lamc.passes.partition.dp import PartitionProblem, Segment, evaluate
from lamc.plan import Alternative


def equal_split(n: int, devices: list[int]) -> tuple[Segment, ...]:
    m = min(n, len(devices))
    bounds = [round(i * n / m) for i in range(m + 1)]
    return tuple(Segment(devices[i], bounds[i], bounds[i + 1]) for i in range(m))


def memory_split(n: int, devices: list[int], cost: CostModel) -> tuple[Segment, ...]:
    """Contiguous units so that each device's share of parameters matches its memory share."""
    params = np.array([u.param_bytes for u in cost.workload.units], dtype=np.float64)
    cumulative = np.cumsum(params) / max(params.sum(), 1.0)
    memory = np.array([cost.devices[d].memory_bytes for d in devices], dtype=np.float64)
    targets = np.cumsum(memory) / memory.sum()
    bounds = [0]
    for i, target in enumerate(targets[:-1]):
        remaining_devices = len(devices) - i - 1
        end = int(np.searchsorted(cumulative, target - 1e-12) + 1)
        end = max(end, bounds[-1] + 1)
        end = min(end, n - remaining_devices)
        bounds.append(end)
    bounds.append(n)
    segments = [
        Segment(devices[i], bounds[i], bounds[i + 1])
        for i in range(len(devices))
        if bounds[i + 1] > bounds[i]
    ]
    return tuple(segments)


def alternatives(
    problem: PartitionProblem,
    memory_ok: np.ndarray,
    cost: CostModel,
    devices: list[int],
    objective: str,
) -> tuple[Alternative, ...]:
    """Each baseline's plan, whether it fits, and its predicted bottleneck and latency.

    `problem` holds the unconstrained costs; `memory_ok[d, j, k]` says whether a stage fits.
    """
    n = cost.n
    names = [d.name for d in cost.devices]
    results: list[Alternative] = []

    def judge(name: str, description: str, segments: tuple[Segment, ...]) -> Alternative:
        over = [
            f"{names[s.device]} needs {cost.memory(s.device, s.start, s.end).total / 2**30:.2f} GiB of {cost.devices[s.device].memory_bytes / 2**30:.2f}"
            for s in segments
            if not memory_ok[s.device, s.start, s.end]
        ]
        bottleneck, latency = evaluate(problem, segments)
        return Alternative(
            name=name,
            description=description,
            feasible=not over and math.isfinite(bottleneck),
            devices=tuple(names[s.device] for s in segments),
            bottleneck_ms=bottleneck,
            latency_ms=latency,
            reason="out of memory: " + "; ".join(over)
            if over
            else ("no route between consecutive devices" if not math.isfinite(bottleneck) else ""),
            unit_ranges=tuple((s.start, s.end) for s in segments),
        )

    if devices:
        results.append(
            judge(
                "equal",
                "same number of units per device (pipelining's even split)",
                equal_split(n, devices),
            )
        )
        results.append(
            judge(
                "memory",
                "units in proportion to device memory (exo, llama.cpp)",
                memory_split(n, devices, cost),
            )
        )
    singles = [judge("single", f"whole model on {names[d]}", (Segment(d, 0, n),)) for d in devices]
    fitting = [a for a in singles if a.feasible]
    key = (lambda a: a.bottleneck_ms) if objective == "throughput" else (lambda a: a.latency_ms)
    if fitting:
        best = min(fitting, key=key)
        results.append(
            Alternative(
                "single",
                f"the best single device ({best.devices[0]})",
                True,
                best.devices,
                best.bottleneck_ms,
                best.latency_ms,
                unit_ranges=best.unit_ranges,
            )
        )
    elif singles:
        fastest = min(singles, key=key)
        results.append(
            Alternative(
                "single",
                "the best single device",
                False,
                fastest.devices,
                fastest.bottleneck_ms,
                fastest.latency_ms,
                "no device holds the whole model",
                unit_ranges=fastest.unit_ranges,
            )
        )
    return tuple(results)


def fluid_bound_ms(cost: CostModel, devices: list[int]) -> float:
    """A lower bound on any plan's bottleneck: all work spread over every device in
    proportion to its speed, with free transfers and unlimited memory."""
    rates = [1.0 / cost.whole_model_ms(d) for d in devices if cost.whole_model_ms(d) > 0]
    return 1.0 / sum(rates) if rates else math.inf

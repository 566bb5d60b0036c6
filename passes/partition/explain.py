"""Why there is no plan, or why a device is left unused: reasons a user can act on."""

from __future__ import annotations

import math

import numpy as np

from lamc.cost import CostModel
from lamc.errors import ConfigError, DoesNotFitError
from lamc.passes.partition import constraints as cons
from lamc.passes.partition.budgets import apply_budgets
from lamc.passes.partition.dp import LATENCY, THROUGHPUT, PartitionProblem, Solution, solve
from lamc.quantity import format_bytes
from lamc.topology import Budgets


def minimal_conflict(
    base: PartitionProblem, applied: list[cons.Constraint]
) -> list[cons.Constraint]:
    """A minimal set of constraints that admits no plan (deletion filter)."""
    needed = list(applied)
    for c in list(applied):
        trial = [x for x in needed if x is not c]
        masked, stages = cons.apply(base.compute, trial)
        if (
            solve(
                PartitionProblem(masked, base.transfer, base.inbound, base.outbound, stages=stages),
                LATENCY,
            )
            is None
        ):
            needed = trial
    return needed


def explain_no_fit(
    cost: CostModel,
    base: PartitionProblem,
    memory: np.ndarray,
    compute: np.ndarray,
    transfer: np.ndarray,
    inbound: np.ndarray,
    outbound: np.ndarray,
) -> None:
    free = PartitionProblem(
        base.compute, np.where(np.isfinite(transfer), transfer, 0.0), inbound, outbound
    )
    if solve(free, LATENCY) is not None:
        names = [d.name for d in cost.devices]
        missing = sorted(
            {
                f"{names[a]} and {names[b]}"
                for a in range(len(names))
                for b in range(len(names))
                if a < b and not np.isfinite(transfer[a, b]).all()
            }
        )
        raise ConfigError(
            f"{cost.topology.path}: links: the model needs devices that have no path between them ({', '.join(missing)})",
            hint="add a link between their hosts",
        )
    n = cost.n
    params = cost.memory(0, 0, n).params
    activations = max(u.peak_activation_bytes for u in cost.workload.units)
    kv = cost.memory(0, 0, n).kv_cache
    need = (
        f"the model needs {format_bytes(params)} of parameters + {format_bytes(activations)} of activations"
        + (f" + {format_bytes(kv)} of KV cache" if kv else "")
    )
    parts = []
    for d, device in enumerate(cost.devices):
        usable = device.memory_bytes - device.runtime_memory_bytes
        # The most units this device could hold as one stage.
        most = max(
            (
                k - j
                for j in range(n)
                for k in range(j + 1, n + 1)
                if memory[d, j, k] <= device.memory_bytes
            ),
            default=0,
        )
        parts.append(
            f"{device.name} has {format_bytes(usable)} free (holds at most {most} of {n} units)"
        )
    raise DoesNotFitError(
        f"does not fit: {need}; " + "; ".join(parts),
        hint="compress the model (--compress int8-dynamic or int4-weight) or add a device with more memory",
    )


def explain_budget_failure(
    base: PartitionProblem,
    applied: list[cons.Constraint],
    budgets: Budgets,
    objective: str,
    memory: np.ndarray,
    capacity: np.ndarray,
) -> None:
    masked, stages = cons.apply(base.compute, applied)
    unconstrained = PartitionProblem(
        masked, base.transfer, base.inbound, base.outbound, stages=stages
    )
    reasons = []
    if budgets.min_memory_headroom is not None:
        problem = apply_budgets(
            unconstrained,
            memory,
            capacity,
            Budgets(min_memory_headroom=budgets.min_memory_headroom),
        )
        if solve(problem, LATENCY) is None:
            reasons.append(
                f"no plan leaves {budgets.min_memory_headroom:.0%} of every device's memory free"
            )
    best_tp = solve(unconstrained, THROUGHPUT)
    best_lat = solve(unconstrained, LATENCY)
    if (
        budgets.min_throughput is not None
        and best_tp is not None
        and 1000.0 / best_tp.bottleneck_ms < budgets.min_throughput
    ):
        reasons.append(
            f"min_throughput {budgets.min_throughput:g}/s: the best plan reaches {1000.0 / best_tp.bottleneck_ms:.3g}/s"
        )
    if (
        budgets.max_latency_ms is not None
        and best_lat is not None
        and best_lat.latency_ms > budgets.max_latency_ms
    ):
        reasons.append(
            f"max_latency_ms {budgets.max_latency_ms:g}: the best plan takes {best_lat.latency_ms:.4g} ms"
        )
    if not reasons:
        reasons.append("no plan meets all budgets together")
    raise DoesNotFitError(
        "budget not met: " + "; ".join(reasons),
        hint="relax the budget, compress the model or add a device",
    )


def unused_reasons(
    cost: CostModel, solution: Solution, applied: list[cons.Constraint], what: str | None = None
) -> dict[str, str]:
    used = {s.device for s in solution.segments}
    reasons: dict[str, str] = {}
    chosen = len(solution.segments)
    what = what or ("bottleneck" if solution.objective == THROUGHPUT else "latency")
    more = {k: v for k, v in solution.best_by_stages.items() if k > chosen}
    for d, device in enumerate(cost.devices):
        if d in used:
            continue
        if any(c.kind == "exclude" and d in c.devices for c in applied):
            reasons[device.name] = "excluded by a constraint"
        elif more:
            best_more = min(more.values())
            reasons[device.name] = (
                f"a plan with more stages is no better: its best {what} is {best_more:.4g} ms vs {solution.value:.4g} ms with {chosen}"
                if math.isfinite(best_more)
                else "no plan with more stages fits"
            )
        else:
            reasons[device.name] = (
                f"no plan with more than {chosen} stage(s) satisfies the constraints"
            )
    return reasons

"""Budgets (latency, throughput, memory headroom) as masks on the stage tables, and the
plan's checks against them."""

from __future__ import annotations

import math

import numpy as np

from lamc.passes.partition.dp import LATENCY, THROUGHPUT, PartitionProblem, Solution, solve
from lamc.plan import BudgetCheck, Plan
from lamc.topology import Budgets


def apply_budgets(
    problem: PartitionProblem, memory: np.ndarray, capacity: np.ndarray, budgets: Budgets
) -> PartitionProblem:
    compute = problem.compute
    if budgets.min_memory_headroom is not None:
        compute = np.where(
            memory <= capacity * (1 - budgets.min_memory_headroom), compute, math.inf
        )
    transfer, inbound, outbound = problem.transfer, problem.inbound, problem.outbound
    if budgets.min_throughput is not None:
        bound = 1000.0 / budgets.min_throughput
        compute = np.where(compute <= bound, compute, math.inf)
        transfer = np.where(transfer <= bound, transfer, math.inf)
        inbound = np.where(inbound <= bound, inbound, math.inf)
        outbound = np.where(outbound <= bound, outbound, math.inf)
    return PartitionProblem(compute, transfer, inbound, outbound, stages=problem.stages)


def meet_latency(
    problem: PartitionProblem, best: Solution, max_latency_ms: float
) -> Solution | None:
    """The throughput-optimal plan is too slow for one request: find the smallest
    bottleneck whose lowest-latency plan meets the latency budget."""
    values = np.unique(
        np.concatenate(
            [
                problem.compute[np.isfinite(problem.compute)],
                problem.transfer[np.isfinite(problem.transfer)],
                problem.inbound,
                problem.outbound,
            ]
        )
    )
    values = values[values >= best.bottleneck_ms]
    found: Solution | None = None
    lo, hi = 0, len(values) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        bound = values[mid] * (1 + 1e-9)
        masked = PartitionProblem(
            np.where(problem.compute <= bound, problem.compute, math.inf),
            np.where(problem.transfer <= bound, problem.transfer, math.inf),
            np.where(problem.inbound <= bound, problem.inbound, math.inf),
            np.where(problem.outbound <= bound, problem.outbound, math.inf),
            stages=problem.stages,
        )
        candidate = solve(masked, LATENCY)
        if candidate is not None and candidate.latency_ms <= max_latency_ms:
            found, hi = candidate, mid - 1
        else:
            lo = mid + 1
    if found is not None:
        found.objective = THROUGHPUT
        found.best_by_stages = best.best_by_stages
    return found


def budget_checks(result: Plan, budgets: Budgets) -> tuple[BudgetCheck, ...]:
    checks = []
    if budgets.max_latency_ms is not None:
        checks.append(
            BudgetCheck(
                "max_latency_ms",
                budgets.max_latency_ms,
                result.latency_ms,
                result.latency_ms <= budgets.max_latency_ms * (1 + 1e-9),
                "ms",
            )
        )
    if budgets.min_throughput is not None:
        checks.append(
            BudgetCheck(
                "min_throughput",
                budgets.min_throughput,
                result.throughput_rps,
                result.throughput_rps >= budgets.min_throughput * (1 - 1e-9),
                "req/s",
            )
        )
    if budgets.min_memory_headroom is not None:
        worst = min(1 - s.memory_bytes / s.capacity_bytes for s in result.stages)
        checks.append(
            BudgetCheck(
                "min_memory_headroom",
                budgets.min_memory_headroom,
                worst,
                worst >= budgets.min_memory_headroom - 1e-12,
                "fraction",
            )
        )
    return tuple(checks)

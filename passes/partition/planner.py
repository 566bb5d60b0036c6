"""From a workload and a topology to the best plan, or a clear reason why there is none.

cost model -> stage / transfer tables -> memory, constraint and budget masks -> exact DP
-> plan with explanations, baselines and the fluid bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from lamc.cost import CostModel
from lamc.errors import ConfigError, DoesNotFitError
from lamc.passes.partition import constraints as cons
from lamc.passes.partition.baselines import alternatives, fluid_bound_ms
from lamc.passes.partition.dp import (
    LATENCY,
    THROUGHPUT,
    PartitionProblem,
    Segment,
    Solution,
    evaluate,
    solve,
)
from lamc.plan import BudgetCheck, Plan, StagePlan
from lamc.quantity import format_bytes
from lamc.topology import Budgets, Constraints, Topology
from lamc.workload import Workload

GENERATE = "generate"  # decoders: prefill + new_tokens decode steps, one sequence


@dataclass
class PlanRequest:
    objective: str = THROUGHPUT
    constraints: Constraints | None = None  # from the command line, on top of the file's
    budgets: Budgets | None = None
    kv_tokens: int = 0  # context x batch, for decoders
    context: int = 0  # the context length planned for (recorded in the manifest)
    compare: bool = False
    codec: str = "raw"  # link codec between stages (auto plans with raw, then chooses)
    # Compression methods each device may use (device name -> candidates); the planner
    # picks, per stage, the one that serves the objective best among those that fit.
    methods: dict[str, tuple[str, ...]] | None = None
    # Objective `generate`: the workload of one decode step (driver.decode_workload) and
    # the tokens generated per prompt. The plan minimises prefill + new_tokens x decode
    # step, each with its compute, link transfers and link latencies: a split that makes
    # decoding slower than it saves is not taken.
    decode: Workload | None = None
    new_tokens: int = 128


def plan(
    workload: Workload, topology: Topology, request: PlanRequest | None = None
) -> tuple[Plan, CostModel]:
    request = request or PlanRequest()
    if request.objective == "auto":
        request = replace(request, objective=GENERATE if request.decode is not None else THROUGHPUT)
    if request.objective not in (THROUGHPUT, LATENCY, GENERATE):
        raise ValueError(f"unknown objective {request.objective!r}")
    if request.objective == GENERATE and request.decode is None:
        raise ConfigError("objective generate needs the decode step's workload (a decoder)")
    codec = request.codec if request.codec in ("fp16", "int8") else "raw"
    cost = CostModel(workload, topology, kv_tokens=request.kv_tokens, codec=codec)
    step: Generation | None = None
    if request.objective == GENERATE:
        assert request.decode is not None
        step = Generation(
            CostModel(request.decode, topology, kv_tokens=request.kv_tokens, codec=codec),
            request.new_tokens,
        )
    file_constraints = cons.resolve(topology.constraints, workload, topology, from_file=True)
    cli_constraints = cons.resolve(request.constraints or Constraints(), workload, topology)
    applied = _override(file_constraints, cli_constraints)
    budgets = topology.budgets.merged(request.budgets or Budgets())

    compute = step.compute(cost) if step else cost.compute_table()
    memory = cost.memory_table()
    capacity = np.array([d.memory_bytes for d in cost.devices])[:, None, None]
    fits = memory <= capacity
    choice: np.ndarray | None = None
    costs = {"fp32": cost}
    method_names = ["fp32"]
    if request.methods:
        compute, memory, fits, choice, costs, method_names = _with_methods(
            workload, topology, request, codec, cost, capacity, step
        )
    transfer, inbound, outbound = _links(cost)
    if step is not None:
        transfer, inbound, outbound = step.links(transfer, inbound, outbound)
    base = PartitionProblem(np.where(fits, compute, math.inf), transfer, inbound, outbound)
    objective = LATENCY if step is not None else request.objective

    # 1. Does the model fit the devices at all (memory and routes only)?
    if solve(base, LATENCY) is None:
        _explain_no_fit(cost, base, memory, compute, transfer, inbound, outbound)

    # 2. Under the user's constraints?
    masked, stages = cons.apply(base.compute, applied)
    problem = PartitionProblem(masked, transfer, inbound, outbound, stages=stages)
    if solve(problem, LATENCY) is None:
        conflict = _minimal_conflict(base, applied)
        raise DoesNotFitError(
            "no plan satisfies the constraints: " + "; ".join(c.text for c in conflict),
            hint="these constraints cannot hold together (with the devices' memory); drop or change one",
        )

    # 3. Under the budgets.
    problem = _apply_budgets(problem, memory, capacity, budgets)
    solution = solve(problem, objective)
    if (
        solution is not None
        and budgets.max_latency_ms is not None
        and solution.latency_ms > budgets.max_latency_ms
    ):
        solution = _meet_latency(problem, solution, budgets.max_latency_ms)
    if solution is None:
        _explain_budget_failure(base, applied, budgets, request.objective, memory, capacity)
    assert solution is not None

    usable = [
        d
        for d in range(len(cost.devices))
        if not any(c.kind == "exclude" and d in c.devices for c in applied)
    ]
    result = _to_plan(workload, topology, cost, solution, request.objective, applied)
    if choice is not None:
        _set_precisions(result, solution, choice, method_names, costs, request)
    if step is not None:
        _explain_generation(result, solution, problem, step, cost, costs, choice, method_names)
    result.fluid_bound_ms = fluid_bound_ms(cost, usable)
    result.budgets = _budget_checks(result, budgets)
    result.unused = _unused_reasons(
        cost, solution, applied, "generation time" if step is not None else None
    )
    if request.compare:
        result.alternatives = alternatives(base, fits, cost, usable, objective)
    return result, cost


def _links(cost: CostModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    devices = range(len(cost.devices))
    inbound = np.array([cost.client_ms(d, 0, inbound=True) for d in devices])
    outbound = np.array([cost.client_ms(d, cost.n, inbound=False) for d in devices])
    return cost.transfer_table(), inbound, outbound


@dataclass
class Generation:
    """The decode step's costs beside the prefill's: what objective `generate` adds up."""

    decode: CostModel
    new_tokens: int

    def compute(self, prefill: CostModel, decode: CostModel | None = None) -> np.ndarray:
        return prefill.compute_table() + self.new_tokens * (decode or self.decode).compute_table()

    def links(
        self, transfer: np.ndarray, inbound: np.ndarray, outbound: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t, i, o = _links(self.decode)
        n = self.new_tokens
        return transfer + n * t, inbound + n * i, outbound + n * o


def _explain_generation(
    result: Plan,
    solution: Solution,
    problem: PartitionProblem,
    step: Generation,
    prefill: CostModel,
    costs: dict[str, CostModel],
    choice: np.ndarray | None,
    names: list[str],
) -> None:
    """Prefill and per-token decode time of the plan, and why it uses as many stages as it
    does: the best plans with one stage more and one fewer, by the same measure."""
    links = {"prefill": _links(prefill), "decode": _links(step.decode)}

    def times(segments: tuple[Segment, ...]) -> tuple[float, float]:
        out = []
        for phase in ("prefill", "decode"):
            transfer, inbound, outbound = links[phase]
            total = float(inbound[segments[0].device] + outbound[segments[-1].device])
            for k, seg in enumerate(segments):
                method = (
                    names[int(choice[seg.device, seg.start, seg.end])]
                    if choice is not None
                    else "fp32"
                )
                cost = (
                    costs.get(method, prefill)
                    if phase == "prefill"
                    else step.decode.with_method(method)
                )
                total += cost.compute_ms(seg.device, seg.start, seg.end)
                if k + 1 < len(segments):
                    total += float(transfer[seg.device, segments[k + 1].device, seg.end])
            out.append(total)
        return out[0], out[1]

    prefill_ms, decode_ms = times(solution.segments)
    total_ms = prefill_ms + step.new_tokens * decode_ms
    # The plan's own figures are the prefill's (one prompt through the pipeline).
    result.bottleneck_ms = max(
        [s.compute_ms for s in result.stages] + [s.transfer_ms for s in result.stages]
    )
    result.latency_ms = prefill_ms
    why = []
    count = len(solution.segments)
    if problem.stages is not None:
        why.append(f"{count} stage(s), as asked")
    for k in (count - 1, count + 1):
        if k < 1 or k > problem.n_devices or problem.stages is not None:
            continue
        other = solve(replace(problem, stages=k), LATENCY)
        if other is None:
            why.append(f"no plan with {k} stage(s) fits the devices and constraints")
            continue
        other_prefill, other_decode = times(other.segments)
        other_total = other_prefill + step.new_tokens * other_decode
        verdict = "slower" if other_total > total_ms else "not faster"
        why.append(
            f"{k} stage(s) would be {verdict}: decode {other_decode:.3g} ms/token "
            f"(vs {decode_ms:.3g}), prefill {other_prefill:.3g} ms (vs {prefill_ms:.3g}), "
            f"{other_total:.4g} ms for {step.new_tokens} tokens (vs {total_ms:.4g})"
        )
    result.generation = {
        "new_tokens": step.new_tokens,
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": decode_ms,
        "total_ms": total_ms,
        "decode_binding": dict(sorted(step.decode.workload.binding.items())),
        "why": why,
    }


def _with_methods(
    workload: Workload,
    topology: Topology,
    request: PlanRequest,
    codec: str,
    fp32: CostModel,
    capacity: np.ndarray,
    step: Generation | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, CostModel], list[str]]:
    """Per device and stage [j, k), the best allowed compression method that fits: its
    compute time and memory, and which one it is (an index into the sorted methods).

    A stage's method changes only its own time and memory (its inputs and outputs stay in
    the manifest's dtypes), so choosing it per entry of the cost tables keeps the
    partitioner exact over cut points, devices and methods together."""
    from lamc.cost import PRECISION_ORDER

    assert request.methods is not None
    names = [d.name for d in fp32.devices]
    wanted = sorted(
        {m for d in names for m in request.methods.get(d, ("fp32",))}, key=PRECISION_ORDER.index
    )
    costs = {
        m: fp32
        if m == "fp32"
        else CostModel(workload, topology, kv_tokens=request.kv_tokens, codec=codec, method=m)
        for m in wanted
    }
    shape = fp32.compute_table().shape
    best = np.full(shape, math.inf)
    best_memory = np.full(shape, math.inf)
    smallest = np.full(shape, math.inf)
    choice = np.full(shape, -1, dtype=np.int64)
    for index, m in enumerate(wanted):
        allowed = np.array([m in request.methods.get(d, ("fp32",)) for d in names])[:, None, None]
        compute_m = (
            step.compute(costs[m], step.decode.with_method(m))
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


def _set_precisions(
    plan_: Plan,
    solution: Solution,
    choice: np.ndarray,
    names: list[str],
    costs: dict[str, CostModel],
    request: PlanRequest,
) -> None:
    """Each stage's method, with its memory and time, and why it was chosen."""
    from dataclasses import replace

    assert request.methods is not None
    stages = []
    for stage, seg in zip(plan_.stages, solution.segments, strict=True):
        method = names[int(choice[seg.device, seg.start, seg.end])]
        cost = costs[method]
        mem = cost.memory(seg.device, seg.start, seg.end)
        options = request.methods.get(stage.device, ("fp32",))
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
    plan_.stages = tuple(stages)


def _override(file: list[cons.Constraint], cli: list[cons.Constraint]) -> list[cons.Constraint]:
    """Command-line stages override the file's; the rest add up."""
    if any(c.kind == "stages" for c in cli):
        file = [c for c in file if c.kind != "stages"]
    return file + cli


def _apply_budgets(
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


def _meet_latency(
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


def _minimal_conflict(
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


def _explain_no_fit(
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


def _explain_budget_failure(
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
        problem = _apply_budgets(
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


def _to_plan(
    workload: Workload,
    topology: Topology,
    cost: CostModel,
    solution: Solution,
    objective: str,
    applied: list[cons.Constraint],
) -> Plan:
    segments = solution.segments
    stages: list[StagePlan] = []
    for i, seg in enumerate(segments):
        device = cost.devices[seg.device]
        mem = cost.memory(seg.device, seg.start, seg.end)
        if i + 1 < len(segments):
            nxt = cost.devices[segments[i + 1].device]
            transfer = cost.transfer_ms(seg.device, segments[i + 1].device, seg.end)
            route = topology.best_route(device.name, nxt.name, cost.link_bytes[seg.end])
            hops = tuple(f"{h.a}->{h.b}" for h in route.hops) if route else ()
            nbytes = float(cost.link_bytes[seg.end])
        else:
            transfer = cost.client_ms(seg.device, cost.n, inbound=False)
            hops = ()
            nbytes = float(cost.cut_bytes[cost.n]) if topology.client else 0.0
        stages.append(
            StagePlan(
                index=i,
                device=device.name,
                host=device.host,
                kind=device.kind,
                backend=device.backends[0],
                start_unit=seg.start,
                end_unit=seg.end,
                units=tuple(u.name for u in workload.units[seg.start : seg.end]),
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
            )
        )
    inbound = cost.client_ms(segments[0].device, 0, inbound=True)
    return Plan(
        model=workload.name,
        topology=topology.name,
        objective=objective,
        binding=dict(sorted(workload.binding.items())),
        stages=tuple(stages),
        bottleneck_ms=solution.bottleneck_ms,
        latency_ms=solution.latency_ms,
        inbound_ms=inbound,
        fluid_bound_ms=math.inf,
        best_by_stages=dict(solution.best_by_stages),
        constraints=tuple(c.text for c in applied),
    )


def _budget_checks(result: Plan, budgets: Budgets) -> tuple[BudgetCheck, ...]:
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


def _unused_reasons(
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


__all__ = ["PlanRequest", "evaluate", "plan"]

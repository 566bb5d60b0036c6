"""From a workload and a topology to the best plan, or a clear reason why there is none.

cost model -> stage / transfer tables -> memory, backend support, constraint and budget
masks -> exact DP -> plan with explanations, baselines and the fluid bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from lamc.cost import CostModel
from lamc.errors import ConfigError, DoesNotFitError, UnsupportedOpError
from lamc.passes.partition import constraints as cons
from lamc.passes.partition import replicate, replicate_plan
from lamc.passes.partition.baselines import alternatives, fluid_bound_ms
from lamc.passes.partition.branch_plan import best_dag, why_not_dag
from lamc.passes.partition.budgets import apply_budgets, budget_checks, meet_latency
from lamc.passes.partition.dp import LATENCY, THROUGHPUT, PartitionProblem, Solution, solve
from lamc.passes.partition.explain import (
    explain_budget_failure,
    explain_no_fit,
    minimal_conflict,
    unused_reasons,
)
from lamc.passes.partition.generation import Generation, explain_generation, links
from lamc.passes.partition.methods import set_precisions, with_methods
from lamc.plan import Alternative, Plan, StagePlan
from lamc.topology import Budgets, Constraints, Topology
from lamc.workload import Workload

GENERATE = "generate"  # decoders: prefill + new_tokens decode steps, one sequence
OBJECTIVES = (THROUGHPUT, LATENCY, GENERATE)


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
    # What each device's backend cannot run: device name -> unit index -> the reason
    # (lamc.compiler.planning asks every backend's `supports` of every node). Such a unit
    # is kept off that device, as a forbid would, and the plan says why.
    unsupported: dict[str, dict[int, str]] | None = None
    # `--input-on`: where inputs originate, on top of the topology's `inputs:`.
    input_origins: dict[str, str] = field(default_factory=dict)
    # `--branches`: auto plans a model with independent branches (CLIP's towers, an
    # encoder per sensor) as a DAG of stages when that beats the best chain; off keeps
    # chains.
    branches: str = "auto"
    # `--replicate`: auto also searches plans whose stages may run on a group of devices,
    # requests reaching the members round-robin by speed (objective throughput), and takes
    # one when its bottleneck beats the chain's; off (the default) keeps one device a stage.
    replicate: str = "off"


def plan(
    workload: Workload, topology: Topology, request: PlanRequest | None = None
) -> tuple[Plan, CostModel]:
    request = request or PlanRequest()
    if request.objective == "auto":
        request = replace(request, objective=GENERATE if request.decode is not None else THROUGHPUT)
    if request.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {request.objective!r}")
    if request.objective == GENERATE and request.decode is None:
        raise ConfigError("objective generate needs the decode step's workload (a decoder)")
    topology = with_input_origins(topology, workload, request.input_origins)
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
    method_names = ["fp32"]
    if request.methods:
        compute, memory, fits, choice, costs, method_names = with_methods(
            workload, topology, request.methods, cost, capacity, step
        )
    support = _support_mask(workload, topology, request.unsupported or {})
    prefill_links = links(cost)
    transfer, inbound, outbound = step.links(prefill_links) if step else prefill_links
    allowed = fits if support is None else fits & support
    base = PartitionProblem(np.where(allowed, compute, math.inf), transfer, inbound, outbound)
    objective = LATENCY if step is not None else request.objective

    # The plan under memory, backend support, routes, constraints and budgets; only when
    # there is none are the looser problems solved, to say which of them rules it out.
    masked, stages = cons.apply(base.compute, applied)
    constrained = PartitionProblem(masked, transfer, inbound, outbound, stages=stages)
    problem = apply_budgets(constrained, memory, capacity, budgets)
    solution = solve(problem, objective)
    if solution is None:
        # 1. Does the model fit the devices at all (memory, backend support and routes)?
        if solve(base, LATENCY) is None:
            if support is not None:
                _explain_unsupported(workload, topology, request.unsupported or {})
            explain_no_fit(cost, base, memory, compute, transfer, inbound, outbound)
        # 2. Under the user's constraints?
        if solve(constrained, LATENCY) is None:
            conflict = minimal_conflict(base, applied)
            names = [d.name for d in cost.devices]
            unrouted = [
                f"{names[a]} and {names[b]}"
                for a in range(len(names))
                for b in range(a + 1, len(names))
                if not np.isfinite(transfer[a, b]).any()
            ]
            raise DoesNotFitError(
                "no plan satisfies the constraints: "
                + "; ".join(c.text for c in conflict)
                + (
                    f" (no route between {', '.join(unrouted[:6])}"
                    + (f" and {len(unrouted) - 6} more pairs" if len(unrouted) > 6 else "")
                    + ")"
                    if unrouted
                    else ""
                ),
                hint="these constraints cannot hold together (with the devices' memory, backends "
                "and links); drop or change one, or link the devices",
            )
    # 3. Under the budgets.
    if (
        solution is not None
        and budgets.max_latency_ms is not None
        and solution.latency_ms > budgets.max_latency_ms
    ):
        solution = meet_latency(problem, solution, budgets.max_latency_ms)
    if solution is None:
        explain_budget_failure(base, applied, budgets, request.objective, memory, capacity)
    assert solution is not None

    usable = [
        d
        for d in range(len(cost.devices))
        if not any(c.kind == "exclude" and d in c.devices for c in applied)
    ]
    result = to_plan(
        workload,
        topology,
        cost,
        solution,
        request.objective,
        applied,
        request.codec,
        _support_notes(workload, request.unsupported or {}),
    )
    if choice is not None:
        assert request.methods is not None
        result = set_precisions(result, solution, choice, method_names, costs, request.methods)
    if step is not None:
        result = explain_generation(
            result, solution, problem, step, cost, prefill_links, choice, method_names
        )
    result = replace(result, fluid_bound_ms=fluid_bound_ms(cost, usable))
    result = replace(
        result,
        budgets=budget_checks(result, budgets),
        unused=unused_reasons(
            cost, solution, applied, "generation time" if step is not None else None
        ),
    )
    if request.compare:
        result = replace(result, alternatives=alternatives(base, fits, cost, usable, objective))
    result = _branch_parallel(workload, topology, request, result, applied, budgets, step)
    result = _replicated(workload, topology, request, result, base, cost, applied, budgets, step)
    return result, cost


def _replicated(
    workload: Workload,
    topology: Topology,
    request: PlanRequest,
    chain: Plan,
    base: PartitionProblem,
    cost: CostModel,
    applied: list[cons.Constraint],
    budgets: Budgets,
    step: Generation | None,
) -> Plan:
    """With `--replicate auto`: the plan with replicated stages instead of `chain` when its
    bottleneck is strictly lower; the notes say what was searched and why not otherwise."""
    if request.replicate != "auto":
        return chain
    blocked = [
        what
        for what, present in (
            (
                f"objective {request.objective} (replicas raise throughput only)",
                request.objective != THROUGHPUT,
            ),
            ("constraints", bool(applied)),
            ("budgets", budgets != Budgets()),
            ("--methods", bool(request.methods)),
            (
                "KV caches (a sequence stays on one device)",
                request.kv_tokens > 0 or step is not None,
            ),
            ("backends that refuse some units", bool(request.unsupported)),
            ("a link codec", request.codec != "raw"),
            ("a branch-parallel plan", chain.is_dag),
        )
        if present
    ]
    if blocked:
        note = f"replicated stages are not searched with {', '.join(blocked)}: each stage has one device"
        return replace(chain, notes=(*chain.notes, note))
    D, n = base.n_devices, base.n_units
    if not replicate.searchable(D, n):
        note = (
            f"replicated stages are searched over at most {replicate.MAX_DEVICES} devices, within "
            f"a budget on the work (4^D (n+1)^3): {D} devices and {n} units are beyond it; each "
            "stage has one device"
        )
        return replace(chain, notes=(*chain.notes, note))
    devices = cost.devices

    def same_engine(a: int, b: int) -> bool:
        """One engine serves both: the same kind of device and backends; a TensorRT
        engine is built for one GPU, so those devices must be alike as well."""
        x, y = devices[a], devices[b]
        if (x.kind, x.backends) != (y.kind, y.backends):
            return False
        if "tensorrt" in x.backends[0]:
            return (x.peak_flops, x.memory_bandwidth) == (y.peak_flops, y.memory_bandwidth)
        return True

    problem = replicate.ReplicatedProblem(base, same_engine)
    found = replicate.solve(problem)
    if found is None or not found.replicated:
        note = "replicated stages searched: no plan with one beats the chain"
        return replace(chain, notes=(*chain.notes, note))
    solution = replicate_plan.as_solution(found, chain.objective)
    base_plan = to_plan(
        workload, topology, cost, solution, chain.objective, applied, "raw", chain.support
    )
    plan = replicate_plan.as_plan(base_plan, found, cost, chain)
    if found.bottleneck_ms >= chain.bottleneck_ms * (1 - 1e-9):
        note = (
            f"replicated stages searched: the best ({plan.text}, bottleneck "
            f"{found.bottleneck_ms:.4g} ms) does not beat the chain"
        )
        alternatives = chain.alternatives
        if request.compare:
            alternatives = (*alternatives, _as_alternative(plan, "replicated"))
        return replace(chain, notes=(*chain.notes, note), alternatives=alternatives)
    used = plan.devices_used
    return replace(
        plan,
        unused={
            name: "a plan without it (replicated stages searched) is as good"
            for name in topology.names()
            if name not in used
        },
        notes=(
            *chain.notes,
            f"replicated stages: requests reach a stage's devices round-robin by speed; the "
            f"best chain's bottleneck is {chain.bottleneck_ms:.4g} ms, this plan's "
            f"{plan.bottleneck_ms:.4g} ms ({chain.bottleneck_ms / plan.bottleneck_ms:.3g}x "
            "the throughput)",
        ),
        alternatives=(*chain.alternatives, _as_alternative(chain, "chain"))
        if request.compare
        else (),
        budgets=budget_checks(plan, budgets),
    )


def _branch_parallel(
    workload: Workload,
    topology: Topology,
    request: PlanRequest,
    chain: Plan,
    applied: list[cons.Constraint],
    budgets: Budgets,
    step: Generation | None,
) -> Plan:
    """The branch-parallel plan instead of `chain` when it is strictly better; with
    `--compare` the other one is listed beside it. Searched only for plans without
    constraints, budgets, per-device methods or a decode step (said in the notes)."""
    if request.branches == "off":
        return chain
    reason = why_not_dag(workload, topology)
    if reason is not None:
        return chain
    blocked = [
        what
        for what, present in (
            ("constraints", bool(applied)),
            ("budgets", budgets != Budgets()),
            ("--methods", bool(request.methods)),
            ("a decode step (objective generate)", step is not None),
            ("KV caches", request.kv_tokens > 0),
            ("backends that refuse some units", bool(request.unsupported)),
            ("a link codec", request.codec != "raw"),
        )
        if present
    ]
    if blocked:
        note = (
            "the model has independent branches, but branch-parallel plans are not searched "
            f"with {', '.join(blocked)}: the plan is a chain"
        )
        return replace(chain, notes=(*chain.notes, note))
    dag = best_dag(workload, topology, chain.objective)
    if dag is None:
        return chain
    if chain.objective == LATENCY:
        better = dag.latency_ms < chain.latency_ms * (1 - 1e-9)
    else:
        lower = dag.bottleneck_ms < chain.bottleneck_ms * (1 - 1e-9)
        tie = abs(dag.bottleneck_ms - chain.bottleneck_ms) <= chain.bottleneck_ms * 1e-9
        better = lower or (tie and dag.latency_ms < chain.latency_ms * (1 - 1e-9))
    if not better:
        if not request.compare:
            return chain
        return replace(chain, alternatives=(*chain.alternatives, _as_alternative(dag, "dag")))
    used = {s.device for s in dag.stages}
    unused = {
        name: "a branch-parallel plan without it is as good"
        for name in topology.names()
        if name not in used
    }
    return replace(
        dag,
        fluid_bound_ms=chain.fluid_bound_ms,
        unused=unused,
        notes=(
            *chain.notes,
            f"branch-parallel: {len(dag.stages)} stages; the best chain's bottleneck is "
            f"{chain.bottleneck_ms:.4g} ms and latency {chain.latency_ms:.4g} ms",
        ),
        alternatives=(*chain.alternatives, _as_alternative(chain, "chain"))
        if request.compare
        else (),
        budgets=budget_checks(dag, budgets),
    )


def _as_alternative(plan: Plan, name: str) -> Alternative:
    """A chain or branch-parallel plan beside the chosen one under `--compare`."""
    description = {
        "chain": "the best single chain of stages",
        "replicated": "the best plan with replicated stages (round-robin by speed)",
    }.get(name, "the best branch-parallel plan (towers on devices of their own)")
    return Alternative(
        name=name,
        description=f"{description}: {plan.text}",
        feasible=True,
        devices=tuple(d for s in plan.stages for d in s.devices),
        bottleneck_ms=plan.bottleneck_ms,
        latency_ms=plan.latency_ms,
        unit_ranges=tuple((s.start_unit, s.end_unit) for s in plan.stages),
    )


def _support_mask(
    workload: Workload, topology: Topology, unsupported: dict[str, dict[int, str]]
) -> np.ndarray | None:
    """[D, n+1, n+1]: False where stage [j, k) holds a unit its device's backend cannot
    run: one forbid per refusal, through the same masks as the user's constraints."""
    names = topology.names()
    forbids = [
        cons.Constraint(
            "forbid", f"{device} cannot run #{u}", units=(u,), devices=(names.index(device),)
        )
        for device, units in sorted(unsupported.items())
        for u in sorted(units)
    ]
    if not forbids:
        return None
    n = len(workload.units)
    table, _ = cons.apply(np.zeros((len(names), n + 1, n + 1)), forbids)
    return np.isfinite(table)


def _support_notes(workload: Workload, unsupported: dict[str, dict[int, str]]) -> tuple[str, ...]:
    """One line per device and unit its backend cannot run, for `lamc plan --explain`."""
    return tuple(
        f"{workload.units[u].name} kept off {device}: {reason}"
        for device, units in sorted(unsupported.items())
        for u, reason in sorted(units.items())
    )


def _explain_unsupported(
    workload: Workload, topology: Topology, unsupported: dict[str, dict[int, str]]
) -> None:
    """A unit that no device's backend runs: nothing else matters (exit 5)."""
    everywhere = set.intersection(*(set(unsupported.get(d, {})) for d in topology.names()))
    if everywhere:
        u = min(everywhere)
        reasons = "; ".join(f"{d}: {unsupported[d][u]}" for d in topology.names())
        raise UnsupportedOpError(
            f"unit {workload.units[u].name} runs on no device's backend ({reasons})",
            hint="add a device whose backend runs it, or list another backend for a device",
        )


def _override(file: list[cons.Constraint], cli: list[cons.Constraint]) -> list[cons.Constraint]:
    """Command-line stages override the file's; the rest add up."""
    if any(c.kind == "stages" for c in cli):
        file = [c for c in file if c.kind != "stages"]
    return file + cli


def to_plan(
    workload: Workload,
    topology: Topology,
    cost: CostModel,
    solution: Solution,
    objective: str,
    applied: list[cons.Constraint],
    codec: str,
    support: tuple[str, ...],
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
                codec=codec if i + 1 < len(segments) else "raw",
            )
        )
    inbound = cost.client_ms(segments[0].device, 0, inbound=True)
    inbound_bytes = cost.inbound_bytes(segments[0].device)
    return Plan(
        model=workload.name,
        topology=topology.name,
        objective=objective,
        binding=dict(sorted(workload.binding.items())),
        stages=tuple(stages),
        bottleneck_ms=solution.bottleneck_ms,
        latency_ms=solution.latency_ms,
        inbound_ms=inbound,
        inbound_bytes=inbound_bytes,
        fluid_bound_ms=math.inf,
        best_by_stages=dict(solution.best_by_stages),
        constraints=tuple(c.text for c in applied),
        support=support,
        search=solution.search,
    )


def with_input_origins(topology: Topology, workload: Workload, extra: dict[str, str]) -> Topology:
    """`topology` with the request's input origins added. Each `--input-on` must name one
    of the model's inputs and a device or host of the topology (exit 3 otherwise); the
    topology's own `inputs:` describe its sensors, and those the model does not take are
    left out."""
    inputs = {t.name for t in workload.cuts[0].tensors}
    own = {k: v for k, v in topology.inputs.items() if k in inputs}
    origins = {**own, **extra}
    if origins == topology.inputs:
        return topology
    places = set(topology.names()) | {d.host for d in topology.devices}
    if topology.client:
        places.add(topology.client)
    for name, origin in extra.items():
        if name not in inputs:
            raise ConfigError(
                f"input origin {name}={origin}: the model has no input {name!r} "
                f"(its inputs: {', '.join(sorted(inputs))})"
            )
        if origin not in places:
            raise ConfigError(f"input origin {name}={origin}: no device or host {origin!r}")
    return replace(topology, inputs=origins, _routes={})


__all__ = ["GENERATE", "OBJECTIVES", "PlanRequest", "Solution", "plan"]

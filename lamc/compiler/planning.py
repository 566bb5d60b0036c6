"""`plan_model`: the one entry to planning, for `lamc plan`, `compile --dry-run` and
`compile`. It resolves what the planner needs from the model and the command line (the
objective, a decoder's decode-step workload, the compression methods each device may use,
and what each device's backend cannot run) and calls the exact partitioner."""

from __future__ import annotations

from dataclasses import replace

from lamc.backends import registry
from lamc.backends.protocol import Backend
from lamc.compiler.analysis import Analysed, decode_workload
from lamc.cost import CostModel
from lamc.errors import UsageError
from lamc.ir import UNIT, annotation, user_frame
from lamc.passes.compress import CompressionError
from lamc.passes.compress.spec import resolve_methods
from lamc.passes.partition.dp import THROUGHPUT
from lamc.passes.partition.planner import GENERATE, PlanRequest, plan
from lamc.plan import Plan
from lamc.topology import Topology


def plan_model(
    analysed: Analysed,
    topology: Topology,
    request: PlanRequest | None = None,
    *,
    compress: str | None = None,
    backend: str = "auto",
) -> tuple[Plan, CostModel]:
    """The best plan of an analysed model over `topology`, and the cost model behind it."""
    request = prepare_request(request or PlanRequest(), analysed)
    request = with_compression(request, compress, topology)
    request = replace(request, unsupported=unsupported_units(analysed, topology, backend))
    return plan(analysed.workload, topology, request)


def with_compression(request: PlanRequest, spec: str | None, topology: Topology) -> PlanRequest:
    """The request with the compression methods each device may use (`--compress SPEC`)."""
    if not spec:
        return request
    try:
        return replace(request, methods=resolve_methods(spec, topology))
    except CompressionError as exc:
        raise UsageError(str(exc)) from None


def prepare_request(request: PlanRequest, analysed: Analysed) -> PlanRequest:
    """Resolve objective `auto` (generate for a decoder with its KV cache, else
    throughput) and give objective `generate` the decode step's workload."""
    if request.context and analysed.captured.kv_cache is None:
        raise UsageError("--context needs a decoder captured with its KV cache (for the zoo: kv=1)")
    objective = request.objective
    if objective == "auto":
        objective = GENERATE if analysed.captured.kv_cache is not None else THROUGHPUT
    if objective == GENERATE and request.decode is None:
        return replace(
            request, objective=objective, decode=decode_workload(analysed, request.context)
        )
    return replace(request, objective=objective)


def unsupported_units(
    analysed: Analysed, topology: Topology, requested: str = "auto"
) -> dict[str, dict[int, str]]:
    """Device name -> unit index -> why the device's backend cannot run that unit (the
    first node of the unit it refuses, with the user's source line where known)."""
    if requested != "auto":
        wanted = registry.get(requested)
        if not any(wanted.serves(b) for d in topology.devices for b in d.backends):
            raise UsageError(
                f"--backend {requested}: no device of {topology.name} lists a {requested} backend"
            )
    by_backend: dict[str, dict[int, str]] = {}
    result: dict[str, dict[int, str]] = {}
    units = range(len(analysed.workload.units))
    for device in topology.devices:
        try:
            backend = registry.for_device(device, requested)
        except UsageError as exc:
            result[device.name] = dict.fromkeys(units, exc.message)
            continue
        if backend.name not in by_backend:
            by_backend[backend.name] = _refusals(analysed, backend)
        if by_backend[backend.name]:
            result[device.name] = by_backend[backend.name]
    return result


def _refusals(analysed: Analysed, backend: Backend) -> dict[int, str]:
    refused: dict[int, str] = {}
    for node in analysed.captured.model.graph:
        unit = annotation(node, UNIT)
        if not isinstance(unit, int) or unit in refused:
            continue
        reason = backend.supports(node)
        if reason is not None:
            where = user_frame(node)
            refused[unit] = f"{backend.name}: {reason}" + (f" (from {where})" if where else "")
    return refused

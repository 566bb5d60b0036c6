"""Build the manifest of a compiled pipeline from the IR, the plan and the built artifacts.

Compile side (it reads the IR); the manifest it produces is read on the edge by
`lamc.manifest`.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from lamc import __version__
from lamc.backends.protocol import Artifact
from lamc.backends.slice import StageGraph
from lamc.errors import InternalError
from lamc.frontend.capture import Captured
from lamc.ir import dims_text, index_ranges, shape_values
from lamc.manifest import (
    ArtifactFile,
    DimRange,
    Edge,
    EdgeTensor,
    KVCache,
    Manifest,
    PlanSummary,
    StageReplica,
    StageSpec,
    TensorSpec,
)
from lamc.plan import Plan
from lamc.topology import Topology
from lamc.workload import Workload


def build_manifest(
    captured: Captured,
    workload: Workload,
    topology: Topology,
    plan: Plan,
    graphs: Sequence[StageGraph],
    artifacts: Sequence[Artifact],
    out_dir: Path,
    context: int = 0,
    weight_files: Mapping[str, ArtifactFile] | None = None,
) -> Manifest:
    values = _values(captured.model)
    stages: list[StageSpec] = []
    names: set[str] = set(captured.input_names) | set(captured.output_names)
    routes = (
        dag_edges(plan, graphs, captured.input_names, captured.output_names)
        if plan.is_dag
        else None
    )
    for graph, artifact, planned in zip(graphs, artifacts, plan.stages):
        if routes is None:
            receives = [t.name for t in workload.cuts[planned.start_unit].tensors]
            sends = [t.name for t in workload.cuts[planned.end_unit].tensors]
        else:
            receives = sorted(n for (_, t), ns in routes.items() if t == planned.index for n in ns)
            sends = sorted(n for (s, _), ns in routes.items() if s == planned.index for n in ns)
        _check_boundaries(graph, receives, sends)
        names |= set(receives) | set(sends) | set(graph.inputs) | set(graph.outputs)
        shared = sorted({ref.file for ref in artifact.weights})
        files = tuple(artifact.files) + tuple((weight_files or {})[path] for path in shared)
        stages.append(
            StageSpec(
                index=planned.index,
                device=planned.device,
                host=planned.host,
                kind=planned.kind,
                backend=artifact.backend,
                providers=tuple(artifact.providers),
                session=dict(artifact.session),
                precision=planned.precision,
                units=planned.units,
                model=artifact.model,
                files=files,
                inputs=tuple(graph.inputs),
                outputs=tuple(graph.outputs),
                receives=tuple(receives),
                sends=tuple(sends),
                predicted={
                    # A replicated stage: its own device's time for one request (what a
                    # session measures), and the group's period per request beside it.
                    "compute_ms": planned.replicas[0].compute_ms
                    if planned.replicas
                    else planned.compute_ms,
                    **({"period_ms": planned.compute_ms} if planned.replicas else {}),
                    "memory_bytes": planned.memory_bytes,
                    "transfer_ms": planned.transfer_ms,
                    "transfer_bytes": planned.transfer_bytes,
                },
                kv_cache=_kv_ownership(captured, graph, context),
                weights=artifact.weights,
                to=None if routes is None else _to(plan, planned.index),
                replicas=tuple(StageReplica(r.device, r.host, r.share) for r in planned.replicas),
            )
        )
    # Token-id inputs get the range of the table they index, checked at the first hop.
    ranges = index_ranges(captured.model)
    # Shape tensors that cross a cut carry their value as dim expressions (stage warm-up).
    crossing = {t for s in stages for t in s.inputs} - {v.name for v in captured.model.graph.inputs}
    shaped = shape_values(captured.model, sorted(crossing))
    tensors = {
        name: _spec(values[name], ranges.get(name), shaped.get(name)) for name in sorted(names)
    }
    edges = []
    sizes = {t.name: t.bytes for c in workload.cuts for t in c.tensors}
    for (source, target), carried in sorted((routes or {}).items()):
        edges.append(
            Edge(
                source=source,
                target=target,
                tensors=tuple(EdgeTensor(name, "raw") for name in sorted(carried)),
                bytes=sum(sizes.get(name, 0) for name in carried),
            )
        )
    for k in range(len(stages) + 1 if routes is None else 0):
        cut = workload.cuts[
            plan.stages[k].start_unit if k < len(stages) else workload.cuts[-1].index
        ]
        edges.append(
            Edge(
                source=k - 1,
                target=k,
                tensors=tuple(EdgeTensor(t.name, "raw") for t in cut.tensors),
                bytes=cut.bytes,
            )
        )
    return Manifest(
        model={
            "name": captured.name,
            "source": captured.source,
            "sha256": captured.source_sha256 or model_sha256(captured.model),
            **(
                {"adapter": captured.adapter, "adapter_sha256": captured.adapter_sha256}
                if captured.adapter
                else {}
            ),
        },
        topology={"name": topology.name, "sha256": topology.sha256},
        provenance=provenance(),
        dims={name: DimRange(low, high) for name, (low, high) in sorted(captured.dims.items())},
        tensors=tensors,
        inputs=tuple(captured.input_names),
        outputs=tuple(captured.output_names),
        stages=tuple(stages),
        edges=tuple(edges),
        plan=PlanSummary.of(plan),
    )


def _to(plan: Plan, index: int) -> int:
    nxt = plan.successor(index)
    return len(plan.stages) if nxt is None else nxt


def dag_edges(
    plan: Plan,
    graphs: Sequence[StageGraph],
    inputs: Sequence[str],
    outputs: Sequence[str],
) -> dict[tuple[int, int], set[str]]:
    """What travels on each edge of a branch-parallel pipeline: (source, target) -> tensor
    names, source -1 the client and target len(stages) the client.

    A stage receives what its engine consumes and what it must hand on. A tensor a stage
    produces reaches a later one along the stages between them; a model input enters at
    the first stage of the chain that needs it (a branch's first stage, or the join for
    the main chain), from the client, as the planner charged it."""
    n = len(plan.stages)
    produced_by = {name: g.index for g in graphs for name in g.outputs}
    ahead: dict[int, set[int]] = {}  # stage -> the stages upstream of it, itself included
    for stage in plan.stages:
        ahead[stage.index] = {stage.index}.union(*(ahead[p] for p in (stage.after or ())))
    # Each stage's chain head: a branch's first stage, the join for the main chain.
    head: dict[int, int] = {}
    for stage in plan.stages:
        after = stage.after or ()
        head[stage.index] = stage.index if not after or stage.index == plan.join else head[after[0]]
    routes: dict[tuple[int, int], set[str]] = {}
    need: dict[int, set[str]] = {k: set(g.inputs) for k, g in enumerate(graphs)}
    need[n] = set(outputs)

    def deliver(name: str, target: int) -> None:
        """`name` reaches `target` from the right source, and that source needs it in turn
        unless it produces it."""
        if target < n and name in graphs[target].outputs:
            return
        if target == n:
            source = n - 1  # the last stage answers the client
        elif name in inputs and name not in produced_by:
            chain_head = head[target]
            source = -1 if target == chain_head else plan.stages[target].after[0]  # type: ignore[index]
        else:
            origin = produced_by[name]
            source = next(p for p in (plan.stages[target].after or ()) if origin in ahead[p])
        routes.setdefault((source, target), set()).add(name)
        if source >= 0 and name not in graphs[source].outputs:
            deliver(name, source)

    for target in [n, *range(n - 1, -1, -1)]:
        for name in sorted(need[target]):
            deliver(name, target)
    return routes


def _check_boundaries(graph: StageGraph, receives: list[str], sends: list[str]) -> None:
    """The slicer and the cuts must agree: what a stage consumes arrives, what it sends it
    either produced or received."""
    arriving, leaving = set(receives), set(sends)
    if not set(graph.inputs) <= arriving:
        raise InternalError(
            f"stage {graph.index} consumes {sorted(set(graph.inputs) - arriving)} that do not arrive"
        )
    if not leaving <= arriving | set(graph.outputs):
        raise InternalError(
            f"stage {graph.index} sends {sorted(leaving - arriving - set(graph.outputs))} it neither receives nor produces"
        )


def _values(model: ir.Model) -> dict[str, ir.Value]:
    found = {v.name: v for v in model.graph.inputs if v.name}
    for node in model.graph:
        for v in node.outputs:
            if v.name:
                found[v.name] = v
    return found


def _spec(
    value: ir.Value,
    int_range: tuple[int, int] | None = None,
    shape_value: list[int | str] | None = None,
) -> TensorSpec:
    dtype = value.dtype.numpy().name if value.dtype is not None else "float32"
    bounds = (int(int_range[0]), int(int_range[1])) if int_range and "int" in dtype else None
    shape = tuple(dims_text(value.shape))
    known = tuple(shape_value) if shape_value is not None and _holds(shape, shape_value) else None
    return TensorSpec(value.name or "", dtype, shape, bounds, known)


def _holds(shape: tuple[int | str, ...], elements: list[int | str]) -> bool:
    """A recorded value must fit its tensor's static shape."""
    if not all(isinstance(d, int) for d in shape):
        return False
    size = 1
    for d in shape:
        size *= int(d)
    return size == len(elements)


def model_sha256(model: ir.Model) -> str:
    """Identity of a captured model: its graph (without weights) and every weight's bytes."""
    import numpy as np

    from lamc.passes.analyze import skeleton

    digest = hashlib.sha256()
    # The graph without its weights (as a deterministic proto), then each weight's bytes.
    digest.update(skeleton(model).SerializeToString(deterministic=True))
    for name, value in sorted(model.graph.initializers.items()):
        digest.update(name.encode())
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.dtype.bitwidth < 8:
            digest.update(tensor.tobytes())
        else:  # hash the buffer in place: no copy of the weights
            digest.update(np.ascontiguousarray(tensor.numpy()).data.cast("B"))
    return digest.hexdigest()


def provenance() -> dict[str, str]:
    found: dict[str, str] = {"lamc": __version__, "python": platform.python_version()}
    for module in ("torch", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "transformers"):
        version = _version(module)
        if version is not None:
            found[module] = version
    return found


def _version(module: str) -> str | None:
    import importlib
    import sys

    if module not in sys.modules:
        # Only report what this compile actually used.
        if module == "transformers":
            return None
        try:
            importlib.import_module(module)
        except ImportError:
            return None
    version: Any = getattr(sys.modules[module], "__version__", None)
    return str(version) if version is not None else None


def _kv_ownership(captured: Captured, graph: StageGraph, context: int) -> KVCache | None:
    """The cache tensors of the layers this stage holds: they stay on the stage (fed back
    from its own presents), and only hidden states travel between stages."""
    kv = captured.kv_cache
    if kv is None:
        return None
    inputs = set(graph.inputs)
    outputs = set(graph.outputs)
    layers: list[int] = []
    past: list[str] = []
    present: list[str] = []
    dtype = "float32"
    values = {v.name: v for v in captured.model.graph.inputs}
    length_only: list[str] = []
    for layer, (pasts, presents) in enumerate(zip(kv.past_inputs, kv.present_outputs)):
        # The owner is the stage that produces the layer's presents (another stage may
        # read a past tensor only for its length).
        if not any(name in outputs for name in presents):
            length_only.extend(n for n in pasts if n in inputs and _shape_only(graph, n))
            continue
        layers.append(layer)
        past.extend(n for n in pasts if n in inputs)
        present.extend(n for n in presents if n in outputs)
        value = values.get(pasts[0])
        if value is not None and value.dtype is not None:
            dtype = value.dtype.numpy().name
    if not layers and not length_only:
        return None
    import numpy as np

    per_token = len(layers) * 2 * kv.kv_heads * kv.head_dim * np.dtype(dtype).itemsize
    return KVCache(
        layers=tuple(layers),
        past_inputs=tuple(past),
        present_outputs=tuple(present),
        dtype=dtype,
        bytes_per_token=per_token,
        max_context=context or kv.max_context,
        past_dim=kv.past_dim,
        length_only=tuple(length_only),
    )


def _shape_only(graph: StageGraph, name: str) -> bool:
    """Whether the stage reads input `name` only through Shape (its values never used)."""
    value = next((v for v in graph.view.inputs if v.name == name), None)
    if value is None:
        return False
    here = {id(node) for node in graph.view}  # the value's uses span every stage
    return all(use.node.op_type == "Shape" for use in value.uses() if id(use.node) in here)

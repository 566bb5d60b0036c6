"""Slice the partitioned IR into one ONNX model per stage.

The partitioner only tags (`lamc.stage` on every node, by `TagStages`); this module reads
those tags and nothing else. A stage model holds only its stage's nodes and the weights
they use. Its inputs are the
tensors it consumes from earlier stages (or the model inputs); its outputs are the
tensors it produces that later stages or the model's outputs need. Tensors that only
pass through a stage (a skip connection spanning it) are forwarded by the executor and do
not appear in the stage model. Constant-only subgraphs are copied into every stage that
uses them instead of crossing a cut. Tensor names are the IR's, so they are stable
across compiles of the same model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from lamc.errors import InternalError
from lamc.ir import CONST, STAGE, UNIT, annotation, node_inputs, subgraph_users

if TYPE_CHECKING:
    from lamc.backends.weights import SharedWeights
from lamc.manifest import WeightRef

# Weights of this size and above go to the stage's external data file (any size of model
# works, since protobuf never holds the weights); smaller tensors stay inside the model:
# ONNX Runtime reads shape-like constants while resolving the graph.
SMALL_TENSOR_BYTES = 1024
# Offsets in the data file are multiples of this (the largest mmap granularity, Windows').
ALIGNMENT = 65536


@dataclass
class WrittenFile:
    name: str  # relative to the stage's directory
    sha256: str
    size: int


@dataclass
class StageGraph:
    """One stage's sub-model (a view on the IR: no weights copied) and the names that cross
    its boundaries."""

    index: int
    view: ir.GraphView
    inputs: list[str]
    outputs: list[str]
    nodes: int
    param_bytes: int
    opset_imports: dict[str, int]
    ir_version: int
    functions: list[ir.Function]
    # The model's metadata (what a compression pass recorded, e.g. lamc.int8.kept_fp32).
    metadata: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"  # the compression method this stage's model went through

    def to_model(self) -> ir.Model:
        """The stage as a standalone IR model (weights shared with the source IR, lazily
        serialised): what a stage pass, such as compression, rewrites."""
        return ir.serde.deserialize_model(self.proto())

    @classmethod
    def from_model(cls, index: int, model: ir.Model, precision: str) -> StageGraph:
        """A stage from a rewritten stage model (its inputs and outputs unchanged)."""
        graph = model.graph
        view = ir.GraphView(
            inputs=list(graph.inputs),
            outputs=list(graph.outputs),
            nodes=list(graph),
            initializers=list(graph.initializers.values()),
            opset_imports=dict(graph.opset_imports),
            name=f"stage{index}",
        )
        return cls(
            index,
            view,
            [v.name or "" for v in graph.inputs],
            [v.name or "" for v in graph.outputs],
            len(graph),
            sum(
                int(v.const_value.nbytes)
                for v in view.initializers.values()
                if v.const_value is not None
            ),
            dict(graph.opset_imports),
            model.ir_version or 10,
            list(model.functions.values()),
            dict(model.metadata_props),
            precision,
        )

    def proto(self, *, weights: bool = True) -> onnx.ModelProto:
        """The stage as one ModelProto; with `weights=False` large initializers are left out
        (written separately by `write`)."""
        view = self.view
        if not weights:
            view = ir.GraphView(
                inputs=list(self.view.inputs),
                outputs=list(self.view.outputs),
                nodes=list(self.view),
                initializers=[v for v in self.view.initializers.values() if not _external(v)],
                opset_imports=self.opset_imports,
                name=self.view.name,
            )
        graph_proto = ir.serde.serialize_graph(view)  # type: ignore[arg-type]
        for node_proto in graph_proto.node:
            # Stack traces and exporter notes: not needed to run, and they hold local paths.
            del node_proto.metadata_props[:]
            node_proto.doc_string = ""
        for value_info in [*graph_proto.input, *graph_proto.output, *graph_proto.value_info]:
            del value_info.metadata_props[:]
        for init in graph_proto.initializer:
            del init.metadata_props[:]
        proto = onnx.ModelProto(ir_version=self.ir_version, graph=graph_proto, producer_name="lamc")
        for key, text in sorted(self.metadata.items()):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, text
        for domain, version in sorted(self.opset_imports.items()):
            proto.opset_import.add(domain=domain, version=version)
        for function in self.functions:
            proto.functions.append(ir.serde.serialize_function(function))
        return proto

    def write(
        self,
        directory: Path,
        model: str = "model.onnx",
        data: str = "model.onnx.data",
        *,
        shared: SharedWeights | None = None,
    ) -> tuple[list[WrittenFile], list[WeightRef]]:
        """Write the stage: the graph in `model`, large weights streamed from memory into
        `data` (each aligned for memory mapping). Both are hashed as they are written.

        With `shared`, weights of a dtype numpy holds go to the artifact's shared weight
        files instead (each tensor stored once across stages and plans; the stage model
        names them as external data at `../weights/...`, and lamc's loader hands them to
        ONNX Runtime memory-mapped); the rest stay in the stage's own `data`."""
        directory.mkdir(parents=True, exist_ok=True)
        proto = self.proto(weights=False)
        large = [v for v in self.view.initializers.values() if _external(v)]
        refs: list[WeightRef] = []
        if shared is not None:
            units = _units_of(self.view)
            kept = []
            for value in large:
                ref = shared.put(value, units.get(value.name or "", "misc"), self.precision)
                if ref is None:
                    kept.append(value)
                    continue
                refs.append(ref)
                _external_entry(proto, value, f"../{ref.file}", ref.offset, ref.length)
            large = kept
        files: list[WrittenFile] = []
        if large:
            digest = hashlib.sha256()
            offset = 0
            with open(directory / data, "wb") as out:
                for value in large:
                    padding = (-offset) % ALIGNMENT
                    if padding:
                        out.write(b"\0" * padding)
                        digest.update(b"\0" * padding)
                        offset += padding
                    raw = raw_bytes(value)
                    out.write(raw)
                    digest.update(raw)
                    _external_entry(proto, value, data, offset, len(raw))
                    offset += len(raw)
            files.append(WrittenFile(data, digest.hexdigest(), offset))
        payload = proto.SerializeToString(deterministic=True)
        (directory / model).write_bytes(payload)
        files.insert(0, WrittenFile(model, hashlib.sha256(payload).hexdigest(), len(payload)))
        return files, refs


def _external_entry(
    proto: onnx.ModelProto, value: ir.Value, location: str, offset: int, length: int
) -> None:
    """Add `value` to the model as an initializer whose bytes live at `location`."""
    tensor = proto.graph.initializer.add()
    tensor.name = value.name or ""
    tensor.data_type = int(value.const_value.dtype)  # type: ignore[union-attr]
    tensor.dims.extend(int(d) for d in value.const_value.shape.numpy())  # type: ignore[union-attr]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, text in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, text


def _units_of(view: ir.GraphView) -> dict[str, str]:
    """Initializer name -> the unit of its first consumer (`u0007`), where annotated."""
    found: dict[str, str] = {}
    for node in view:
        unit = annotation(node, UNIT)
        if not isinstance(unit, int):
            continue
        for value in node_inputs(node):
            if value.name and value.name not in found:
                found[value.name] = f"u{unit:04d}"
    return found


def _external(value: ir.Value) -> bool:
    tensor = value.const_value
    return tensor is not None and tensor.nbytes >= SMALL_TENSOR_BYTES


def raw_bytes(value: ir.Value) -> memoryview:
    """The tensor's bytes, without a copy where its buffer allows (little-endian, as ONNX)."""
    tensor = value.const_value
    assert tensor is not None
    if tensor.dtype.bitwidth < 8:  # packed 4-bit types: numpy would unpack them
        return memoryview(tensor.tobytes())
    return np.ascontiguousarray(tensor.numpy()).data.cast("B")


def slice_stages(model: ir.Model) -> list[StageGraph]:
    """Cut `model` into one sub-model per stage, as its nodes' `lamc.stage` tags say."""
    graph = model.graph
    nodes = list(graph)
    const_ids = {id(n) for n in nodes if annotation(n, CONST)}
    stage_of: dict[int, int] = {}
    for node in nodes:
        if id(node) in const_ids:
            continue
        stage = annotation(node, STAGE)
        if not isinstance(stage, int) or stage < 0:
            raise InternalError(f"node {node.name} has no stage tag; run TagStages before slicing")
        stage_of[id(node)] = stage
    if not stage_of:
        raise InternalError("the model has no tagged node to slice")
    n_stages = max(stage_of.values()) + 1
    missing = sorted(set(range(n_stages)) - set(stage_of.values()))
    if missing:
        raise InternalError(f"stage(s) {missing} have no node; the tags skip a stage")
    graph_outputs = {id(v) for v in graph.outputs}
    users = subgraph_users(nodes)
    stages = []
    for k in range(n_stages):
        members = [n for n in nodes if stage_of.get(id(n)) == k]
        stages.append(
            _slice_one(model, k, members, nodes, stage_of, const_ids, graph_outputs, users)
        )
    return stages


def slice_nodes(model: ir.Model, members: Iterable[ir.Node], name: str = "part") -> StageGraph:
    """A sub-model of an arbitrary node set (used to time single units)."""
    nodes = list(model.graph)
    wanted = {id(n) for n in members}
    const_ids = {id(n) for n in nodes if annotation(n, CONST)}
    # Every node outside the set counts as "later": whatever it uses becomes an output.
    stage_of = {id(n): (0 if id(n) in wanted else 1) for n in nodes if id(n) not in const_ids}
    chosen = [n for n in nodes if id(n) in wanted and id(n) not in const_ids]
    outputs = {id(v) for v in model.graph.outputs}
    users = subgraph_users(nodes)
    result = _slice_one(model, 0, chosen, nodes, stage_of, const_ids, outputs, users)
    result.view.name = name
    return result


def _slice_one(
    model: ir.Model,
    k: int,
    members: list[ir.Node],
    all_nodes: list[ir.Node],
    stage_of: dict[int, int],
    const_ids: set[int],
    graph_outputs: set[int],
    users: Callable[[ir.Value], list[ir.Node]],
) -> StageGraph:
    member_ids = {id(n) for n in members}
    # Constant-only producers this stage needs, copied in (transitively).
    needed_consts: set[int] = set()
    frontier = list(members)
    while frontier:
        node = frontier.pop()
        for value in node_inputs(node):
            producer = value.producer()
            if (
                producer is not None
                and id(producer) in const_ids
                and id(producer) not in needed_consts
            ):
                needed_consts.add(id(producer))
                frontier.append(producer)
    included = member_ids | needed_consts
    ordered = [n for n in all_nodes if id(n) in included]

    inputs: list[ir.Value] = []
    initializers: list[ir.Value] = []
    seen: set[int] = set()
    for node in ordered:
        for value in node_inputs(node):
            if id(value) in seen:
                continue
            seen.add(id(value))
            producer = value.producer()
            if value.is_initializer():
                initializers.append(value)
            elif producer is None or id(producer) not in included:
                inputs.append(value)
    outputs: list[ir.Value] = []
    for node in members:
        for value in node.outputs:
            later = any(stage_of.get(id(user), -1) > k for user in users(value))
            if id(value) in graph_outputs or later:
                outputs.append(value)
    if not outputs:
        raise InternalError(f"stage {k} produces nothing that is used")
    view = ir.GraphView(
        inputs=inputs,
        outputs=outputs,
        nodes=ordered,
        initializers=initializers,
        opset_imports=dict(model.graph.opset_imports),
        name=f"stage{k}",
    )
    used_domains = {n.domain for n in ordered}
    opsets = {d: v for d, v in model.graph.opset_imports.items() if d == "" or d in used_domains}
    functions = [
        f
        for f in model.functions.values()
        if (f.domain, f.name) in {(n.domain, n.op_type) for n in ordered}
    ]
    param_bytes = sum(int(v.const_value.nbytes) for v in initializers if v.const_value is not None)
    return StageGraph(
        k,
        view,
        [v.name or "" for v in inputs],
        [v.name or "" for v in outputs],
        len(members),
        param_bytes,
        opsets,
        model.ir_version or 10,
        functions,
    )

"""Slice the partitioned IR into one ONNX model per stage.

A stage model holds only its stage's nodes and the weights they use. Its inputs are the
tensors it consumes from earlier stages (or the model inputs); its outputs are the
tensors it produces that later stages or the model's outputs need. Tensors that only
pass through a stage (a skip connection spanning it) are forwarded by the executor and do
not appear in the stage model. Constant-only subgraphs are copied into every stage that
uses them instead of crossing a cut. Tensor names are the IR's, so they are stable
across compiles of the same model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from lamc.errors import InternalError
from lamc.ir import annotation
from lamc.passes.units import CONST

# Protobuf cannot serialise a message over 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors this small stay inside the model even when the rest goes external: ONNX Runtime
# reads shape-like constants during graph resolution, before external data is loaded.
SMALL_TENSOR_BYTES = 1024


@dataclass
class StageGraph:
    """One stage's sub-model and the names that cross its boundaries."""

    index: int
    proto: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    nodes: int
    param_bytes: int


def slice_stages(model: ir.Model, unit_to_stage: Sequence[int], n_stages: int) -> list[StageGraph]:
    """Cut `model` into `n_stages` sub-models; `unit_to_stage[u]` is the stage of unit u."""
    graph = model.graph
    nodes = list(graph)
    const_ids = {id(n) for n in nodes if annotation(n, CONST)}
    stage_of: dict[int, int] = {}
    for node in nodes:
        if id(node) in const_ids:
            continue
        unit = annotation(node, "lamc.unit")
        if unit is None:
            raise InternalError(f"node {node.name} has no unit; run BuildUnits before slicing")
        stage_of[id(node)] = unit_to_stage[unit]
    graph_outputs = {id(v) for v in graph.outputs}
    stages = []
    for k in range(n_stages):
        members = [n for n in nodes if stage_of.get(id(n)) == k]
        stages.append(_slice_one(model, k, members, nodes, stage_of, const_ids, graph_outputs))
    return stages


def slice_nodes(model: ir.Model, members: Iterable[ir.Node], name: str = "part") -> StageGraph:
    """A sub-model of an arbitrary node set (used to time single units)."""
    nodes = list(model.graph)
    wanted = {id(n) for n in members}
    const_ids = {id(n) for n in nodes if annotation(n, CONST)}
    # Every node outside the set counts as "later": whatever it uses becomes an output.
    stage_of = {id(n): (0 if id(n) in wanted else 1) for n in nodes if id(n) not in const_ids}
    chosen = [n for n in nodes if id(n) in wanted and id(n) not in const_ids]
    result = _slice_one(
        model, 0, chosen, nodes, stage_of, const_ids, {id(v) for v in model.graph.outputs}
    )
    result.proto.graph.name = name
    return result


def _slice_one(
    model: ir.Model,
    k: int,
    members: list[ir.Node],
    all_nodes: list[ir.Node],
    stage_of: dict[int, int],
    const_ids: set[int],
    graph_outputs: set[int],
) -> StageGraph:
    member_ids = {id(n) for n in members}
    # Constant-only producers this stage needs, copied in (transitively).
    needed_consts: set[int] = set()
    frontier = list(members)
    while frontier:
        node = frontier.pop()
        for value in node.inputs:
            producer = value.producer() if value is not None else None
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
        for value in node.inputs:
            if value is None or id(value) in seen:
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
            later = any(stage_of.get(id(use.node), -1) > k for use in value.uses())
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
    graph_proto = ir.serde.serialize_graph(view)  # type: ignore[arg-type]
    for node_proto in graph_proto.node:
        # Stack traces and exporter notes: not needed to run, and they hold local paths.
        del node_proto.metadata_props[:]
        node_proto.doc_string = ""
    for value_info in [*graph_proto.input, *graph_proto.output, *graph_proto.value_info]:
        del value_info.metadata_props[:]
    for init in graph_proto.initializer:
        del init.metadata_props[:]
    proto = onnx.ModelProto(
        ir_version=model.ir_version or 10, graph=graph_proto, producer_name="lamc"
    )
    used_domains = {n.domain for n in ordered}
    for domain, version in sorted(model.graph.opset_imports.items()):
        if domain == "" or domain in used_domains:
            proto.opset_import.add(domain=domain, version=version)
    for function in model.functions.values():
        if (function.domain, function.name) in {(n.domain, n.op_type) for n in ordered}:
            proto.functions.append(ir.serde.serialize_function(function))
    param_bytes = sum(int(v.const_value.nbytes) for v in initializers if v.const_value is not None)
    return StageGraph(
        k,
        proto,
        [v.name or "" for v in inputs],
        [v.name or "" for v in outputs],
        len(members),
        param_bytes,
    )


def save_stage(stage: StageGraph, path: str, *, external_data: str | None = None) -> list[str]:
    """Write a stage model deterministically; large models put weights in `external_data`.

    Returns the files written (relative to the model's directory)."""
    import os

    proto = stage.proto
    total = sum(len(t.raw_data) for t in proto.graph.initializer)
    files = [os.path.basename(path)]
    if external_data is not None and total > EXTERNAL_DATA_THRESHOLD:
        directory = os.path.dirname(path)
        data_path = os.path.join(directory, external_data)
        offset = 0
        with open(data_path, "wb") as data:
            for tensor in proto.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < SMALL_TENSOR_BYTES:
                    continue
                data.write(raw)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (
                    ("location", external_data),
                    ("offset", str(offset)),
                    ("length", str(len(raw))),
                ):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += len(raw)
        files.append(external_data)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))
    return files

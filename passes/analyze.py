"""Analysis: shapes, dtypes, FLOPs, bytes and module scope of every node.

Shapes stay symbolic on the IR (`batch`, `seq`, `past + seq`); costs are numbers at one
binding of the symbols (the operating point), because costs are what the partitioner
compares. Re-run the pass with another binding to plan for another shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from lamc.dims import eval_dim
from lamc.errors import CaptureError, InternalError
from lamc.ir import (
    COST,
    SCOPE,
    Scope,
    UnresolvedDim,
    annotate,
    annotation,
    eval_shape,
    itemsize,
    module_scope,
    node_inputs,
    numel,
    scope_named,
    subgraphs,
)
from lamc.passes import op_costs
from lamc.passes.base import Pass, PassResult

# Initializers above this many elements are replaced by typed inputs before ONNX shape
# inference runs, so that it never copies the weights.
_INLINE_LIMIT = 4096


@dataclass(frozen=True)
class NodeCost:
    op_class: str
    flops: float
    matrix_flops: float
    param_bytes: int
    output_bytes: int
    # Bytes read and written by the op (weights included): the memory-bound side of the roofline.
    moved_bytes: int
    resolved: bool = True
    # The precision the op computes in (fp32, fp16, bf16, int8, int4): picks the device's peak.
    dtype: str = "fp32"
    # Of moved_bytes, how many are weights read from memory (the rest are activations).
    weight_read_bytes: int = 0


@dataclass(frozen=True)
class AnalysisSummary:
    binding: dict[str, int]
    nodes: int
    flops: float
    matrix_flops: float
    param_bytes: int
    unresolved: tuple[str, ...]


class Analyze(Pass):
    """Annotates every node with `lamc.scope` and `lamc.cost` at `binding`."""

    def __init__(self, binding: Mapping[str, int]) -> None:
        super().__init__()
        self.binding = dict(binding)

    def requires(self, model: ir.Model) -> None:
        for value in model.graph.inputs:
            if value.shape is None or value.dtype is None:
                raise CaptureError(
                    f"graph input {value.name!r} has no shape or dtype; lamc needs typed inputs"
                )

    def call(self, model: ir.Model) -> PassResult:
        fill_shapes(model)
        concrete = concrete_shapes(model, self.binding)
        model.meta["lamc.concrete_shapes"] = concrete
        graph = model.graph
        unresolved: list[str] = []
        total_flops = total_matrix = 0.0
        scopes = borrowed_scopes(graph)
        for position, node in enumerate(graph):
            scope = scopes[node]
            annotate(node, SCOPE, list(scope.paths))
            node.meta["lamc.scope_classes"] = scope.classes
            cost = node_cost(node, self.binding, concrete)
            if not cost.resolved:
                unresolved.append(node.name or f"{node.op_type} (node {position})")
            annotate(node, COST, cost)
            total_flops += cost.flops
            total_matrix += cost.matrix_flops
        params = sum(
            int(v.const_value.nbytes)
            for v in graph.initializers.values()
            if v.const_value is not None
        )
        summary = AnalysisSummary(
            binding=dict(self.binding),
            nodes=len(graph),
            flops=total_flops,
            matrix_flops=total_matrix,
            param_bytes=params,
            unresolved=tuple(unresolved),
        )
        model.meta["lamc.analysis"] = summary
        model.metadata_props["lamc.binding"] = json.dumps(self.binding, sort_keys=True)
        return PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if annotation(node, COST) is None:
                raise InternalError(f"node {node.name} has no cost after Analyze")


def borrowed_scopes(graph: ir.Graph) -> dict[ir.Node, Scope]:
    """Every node's module scope. A node an optimiser made (a fused `Attention_0` or
    `SkipLayerNorm_AddBias_3`, named by no module) takes the scope its scoped neighbours
    share: the common prefix of its producers' and consumers' scopes, wave after wave
    outward from the named nodes (each node settled once). So a fused layer's ops stay in
    that layer's unit, and only what joins two layers falls to their common parent."""
    scopes = {node: module_scope(node) for node in graph}
    known = {node for node in graph if scope_named(node)}
    if not known or len(known) == len(scopes):
        return scopes  # no names at all (units come from the structure), or all named
    members = set(scopes)
    frontier = {
        other
        for node in known
        for other in _neighbours(node)
        if other in members and other not in known
    }
    while frontier:
        settled = []
        for node in frontier:
            around = [
                scopes[other]
                for other in _neighbours(node)
                if other in known and scopes[other].paths
            ]
            if around:
                depth = min(len(s.paths) for s in around)
                while depth and len({s.paths[:depth] for s in around}) > 1:
                    depth -= 1
                if depth:
                    scopes[node] = Scope(around[0].paths[:depth], around[0].classes[:depth])
            settled.append(node)
        known.update(settled)
        frontier = {
            other
            for node in settled
            for other in _neighbours(node)
            if other in members and other not in known
        }
    return scopes


def _neighbours(node: ir.Node) -> list[ir.Node]:
    """The nodes that produce `node`'s inputs and that consume its outputs."""
    found: list[ir.Node] = []
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None:
            found.append(producer)
    for value in node.outputs:
        found.extend(use.node for use in value.uses())
    return found


def node_cost(
    node: ir.Node, binding: Mapping[str, int], concrete: Mapping[str, tuple[int, ...]] | None = None
) -> NodeCost:
    """The cost of one node at `binding`; `resolved=False` when a shape is unknown.

    `concrete` holds shapes inferred at the binding, for values whose symbolic shape
    cannot be evaluated (a Reshape to `4*batch` that ONNX inference leaves unnamed).
    """
    cls = op_costs.FUSED if op_costs.is_fused_epilogue(node) else op_costs.op_class(node)
    resolved = True

    def shape_of(value: ir.Value | None) -> tuple[int, ...] | None:
        nonlocal resolved
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(value.const_value.shape.numpy())
        try:
            return eval_shape(value.shape, binding)
        except UnresolvedDim:
            if concrete is not None and value.name and value.name in concrete:
                return concrete[value.name]
            resolved = False
            return None

    ins = [shape_of(v) for v in node.inputs]
    outs = [shape_of(v) for v in node.outputs]
    try:
        flops, matrix = op_costs.flops(node, ins, outs)
    except ValueError:
        flops, matrix, resolved = 0.0, 0.0, False
    param_bytes = sum(
        int(v.const_value.nbytes)
        for v in node.inputs
        if v is not None and v.is_initializer() and v.const_value is not None
    )
    out_bytes = 0
    for value, shape in zip(node.outputs, outs):
        if shape is not None:
            out_bytes += int(numel(shape) * itemsize(value.dtype))
    moved = weight_read = 0
    if op_costs.moves_bytes(node):
        moved = out_bytes
        gathered = op_costs.gathered_inputs(node)
        for position, (inp, shape) in enumerate(zip(node.inputs, ins)):
            if inp is None or shape is None:
                continue
            size = int(numel(shape) * itemsize(inp.dtype))
            if position in gathered:
                # A gather or slice reads only the elements it returns, not its whole input.
                size = min(size, out_bytes)
            moved += size
            if inp.is_initializer():
                weight_read += size
    inner = _control_flow_cost(node, binding, concrete)
    if inner is not None:
        # Control flow is costed with what it runs: an If's heavier branch, a Loop's or
        # Scan's body once per iteration; the weights its subgraphs read are its own.
        flops += inner.flops
        matrix += inner.matrix_flops
        moved += inner.moved_bytes
        weight_read += inner.weight_read_bytes
        resolved = resolved and inner.resolved
        param_bytes = sum(
            int(v.const_value.nbytes)
            for v in node_inputs(node)
            if v.is_initializer() and v.const_value is not None
        )
    return NodeCost(
        cls,
        flops,
        matrix,
        param_bytes,
        out_bytes,
        moved,
        resolved,
        compute_dtype(node),
        weight_read,
    )


def _control_flow_cost(
    node: ir.Node, binding: Mapping[str, int], concrete: Mapping[str, tuple[int, ...]] | None
) -> NodeCost | None:
    """What the subgraphs of `node` cost per run of it (None: it holds none). The number of
    iterations of a Loop is its trip count where that is a constant, of a Scan the length
    of its first scanned input; otherwise one, and the cost is marked unresolved."""
    graphs = subgraphs(node)
    if not graphs:
        return None
    per_graph = []
    for graph in graphs:
        costs = [node_cost(inner, binding, concrete) for inner in graph]
        per_graph.append(
            NodeCost(
                op_costs.DATA,
                sum(c.flops for c in costs),
                sum(c.matrix_flops for c in costs),
                0,
                0,
                sum(c.moved_bytes for c in costs),
                all(c.resolved for c in costs),
                "fp32",
                sum(c.weight_read_bytes for c in costs),
            )
        )
    if node.op_type == "If":
        return max(per_graph, key=lambda c: (c.flops, c.moved_bytes))
    body = per_graph[0]
    trips, known = _iterations(node, binding)
    return NodeCost(
        body.op_class,
        body.flops * trips,
        body.matrix_flops * trips,
        0,
        0,
        body.moved_bytes * trips,
        body.resolved and known,
        body.dtype,
        body.weight_read_bytes * trips,
    )


def _iterations(node: ir.Node, binding: Mapping[str, int]) -> tuple[int, bool]:
    """(iterations, whether lamc knows them) of a Loop or Scan."""
    if node.op_type == "Loop" and node.inputs and node.inputs[0] is not None:
        tensor = node.inputs[0].const_value
        if tensor is not None and tensor.size == 1:
            return max(int(tensor.numpy().reshape(())), 0), True
    if node.op_type == "Scan":
        scanned = node.attributes.get_int("num_scan_inputs", 0)
        first = len(node.inputs) - scanned
        scanned_input = node.inputs[first] if scanned and first < len(node.inputs) else None
        if scanned_input is not None:
            axes = node.attributes.get_ints("scan_input_axes", [0]) or [0]
            try:
                shape = eval_shape(scanned_input.shape, binding)
                return shape[axes[0]], True
            except (UnresolvedDim, IndexError):
                pass
    return 1, False


_DTYPE_NAMES = {
    ir.DataType.FLOAT: "fp32",
    ir.DataType.DOUBLE: "fp32",
    ir.DataType.FLOAT16: "fp16",
    ir.DataType.BFLOAT16: "bf16",
    ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "int8",
    ir.DataType.INT4: "int4",
    ir.DataType.UINT4: "int4",
}


def compute_dtype(node: ir.Node) -> str:
    """The precision of a node's arithmetic: 4-bit for MatMulNBits, 8-bit for integer
    matmuls and convs, else the dtype of its weight (matmul/conv) or of its output."""
    if node.op_type == "MatMulNBits":
        return "int4" if node.attributes.get_int("bits", 4) <= 4 else "int8"
    if node.op_type in (
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
    ):
        return "int8"
    candidates = (
        [v for v in node.inputs[1:2] if v is not None]
        if op_costs.op_class(node) in (op_costs.MATRIX, op_costs.CONV)
        else []
    )
    candidates += [v for v in node.outputs]
    for value in candidates:
        if value.dtype in _DTYPE_NAMES:
            return _DTYPE_NAMES[value.dtype]
    return "fp32"


def skeleton(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose large initializers are typed inputs (no weight bytes)."""
    graph = model.graph
    large = [
        v
        for v in graph.initializers.values()
        if v.const_value is not None
        and (v.const_value.size > _INLINE_LIMIT or not has_data(v.const_value))
    ]
    large_ids = {id(v) for v in large}
    small = [v for v in graph.initializers.values() if id(v) not in large_ids]
    view = ir.GraphView(
        inputs=[*graph.inputs, *large],
        outputs=list(graph.outputs),
        nodes=list(graph),
        initializers=small,
        opset_imports=dict(graph.opset_imports),
        name=graph.name or "main",
    )
    proto = onnx.ModelProto(ir_version=model.ir_version or 10, graph=ir.serde.serialize_graph(view))  # type: ignore[arg-type]
    for domain, version in graph.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    for function in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(function))
    return proto


def has_data(tensor: ir.TensorProtocol) -> bool:
    """False for a tensor on PyTorch's meta device (a shapes-only capture)."""
    raw = getattr(tensor, "raw", None)
    device = getattr(raw, "device", None)
    return getattr(device, "type", None) != "meta"


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        return onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception:
        return None


def concrete_shapes(model: ir.Model, binding: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Every value's concrete shape at `binding`, by ONNX inference from concrete inputs."""
    proto = skeleton(model)
    n_inputs = len(model.graph.inputs)
    for value, info in zip(model.graph.inputs, proto.graph.input[:n_inputs]):
        try:
            shape = eval_shape(value.shape, binding)
        except UnresolvedDim:
            return {}
        dims = info.type.tensor_type.shape.dim
        for d, size in zip(dims, shape):
            d.Clear()
            d.dim_value = size
    # The shapes the graph already knows, made concrete where the binding evaluates them:
    # inference keeps a known `seq + 4` over the 20 it would compute.
    for info in [*proto.graph.value_info, *proto.graph.output]:
        for d in info.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                try:
                    size = eval_dim(d.dim_param, binding)
                except UnresolvedDim:
                    continue
                d.Clear()
                d.dim_value = size
    inferred = _infer(proto)
    if inferred is None:
        return {}
    found: dict[str, tuple[int, ...]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tt = info.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            found[info.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    return found


def fill_shapes(model: ir.Model) -> int:
    """Fill unknown dims of intermediate values by ONNX shape inference (data propagation
    on), then, for what that leaves unknown (a Loop's outputs, ONNX Runtime's contrib
    ops), by ONNX Runtime's symbolic shape inference.

    Known dims are kept as they are, so the exporter's symbol names survive. Returns how
    many values gained information.
    """
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs if v.name}
    if not any(_incomplete(v) for v in values.values()):
        return 0
    skeleton_proto = skeleton(model)
    gained = 0
    inferred = _infer(skeleton_proto)
    if inferred is not None:
        gained += _take_shapes(inferred, values)
    if any(_incomplete(v) for v in values.values()):
        symbolic = _infer_symbolic(skeleton_proto)
        if symbolic is not None:
            gained += _take_shapes(symbolic, values)
    return gained


def _infer_symbolic(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference (it knows Loop, Scan and contrib ops)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred: onnx.ModelProto = SymbolicShapeInference.infer_shapes(
            proto, auto_merge=True, guess_output_rank=False
        )
        return inferred
    except Exception:  # a model it cannot follow: the values stay unknown, and say so
        return None


def _dim_text(text: str) -> str | None:
    """A symbolic dim lamc can evaluate (names, integers, + - * // %), else None."""
    import ast

    if not text or text.startswith("unk__"):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None
    allowed = (ast.Expression, ast.Name, ast.Constant, ast.BinOp, ast.Load)
    allowed_ops = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
    for node in ast.walk(tree):
        if isinstance(node, allowed_ops):
            continue
        if not isinstance(node, allowed) or (
            isinstance(node, ast.Constant) and not isinstance(node.value, int)
        ):
            return None
    return text


def _take_shapes(inferred: onnx.ModelProto, values: Mapping[str, ir.Value]) -> int:
    gained = 0
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        value = values.get(info.name)
        if value is None or not _incomplete(value) or not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        if value.dtype is None and tensor_type.elem_type:
            value.dtype = ir.DataType(tensor_type.elem_type)
        if not tensor_type.HasField("shape"):
            continue
        dims: list[int | str | None] = []
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(_dim_text(d.dim_param))
            else:
                dims.append(None)
        if value.shape is None or len(value.shape) != len(dims):
            value.shape = ir.Shape(dims)
        else:
            merged = [
                old
                if isinstance(old, int)
                or (isinstance(old, ir.SymbolicDim) and old.value is not None)
                else new
                for old, new in zip(value.shape.dims, dims)
            ]
            value.shape = ir.Shape(merged)
        gained += 1
    return gained


def _incomplete(value: ir.Value) -> bool:
    if value.shape is None or value.dtype is None:
        return True
    return any(isinstance(d, ir.SymbolicDim) and d.value is None for d in value.shape.dims)

"""Helpers on the IR (an `onnx_ir.Model`) for lamc's annotations.

Annotations live in `node.meta` under `lamc.*` keys for passes to read, and are mirrored
as JSON into `node.metadata_props` so that a dumped IR (`--dump-ir`) keeps them.
Module scopes come from the torch exporter's metadata or, for ONNX files from other
exporters, from node names of the form `/encoder/layer.0/attention/MatMul`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import onnx_ir as ir

from lamc.dims import UnresolvedDim, eval_dim

__all__ = ["UnresolvedDim", "eval_dim"]

SCOPE = "lamc.scope"
COST = "lamc.cost"
UNIT = "lamc.unit"
STAGE = "lamc.stage"
# Constant-only subgraphs: copied into every stage that uses them instead of crossing a cut.
CONST = "lamc.rematerialize"

_TORCH_SCOPES = "pkg.torch.onnx.name_scopes"
_TORCH_CLASSES = "pkg.torch.onnx.class_hierarchy"
_TORCH_STACK = "pkg.torch.onnx.stack_trace"


def annotate(node: ir.Node, key: str, value: Any) -> None:
    """Set annotation `key` on `node` (in `meta`, mirrored as JSON in `metadata_props`)."""
    node.meta[key] = value
    plain = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    node.metadata_props[key] = json.dumps(plain, sort_keys=True)


def annotation(node: ir.Node, key: str, default: Any = None) -> Any:
    """Read annotation `key` of `node`; falls back to the JSON mirror of a reloaded IR."""
    if key in node.meta:
        return node.meta[key]
    raw = node.metadata_props.get(key)
    return json.loads(raw) if raw is not None else default


@dataclass(frozen=True)
class Scope:
    """The module path of a node: `paths[i]` is a module (`transformer.h.3`) and
    `classes[i]` its class, outermost first; classes are None when unknown."""

    paths: tuple[str, ...]
    classes: tuple[str | None, ...]


def module_scope(node: ir.Node) -> Scope:
    """Module scope of `node` from the exporter's metadata, else from its name."""
    raw_paths = node.metadata_props.get(_TORCH_SCOPES)
    if raw_paths is not None:
        paths = _literal_list(raw_paths)
        classes = _literal_list(node.metadata_props.get(_TORCH_CLASSES, "[]"))
        # Element 0 is the root module, the last one the aten op: keep the modules between.
        mods = paths[1:-1]
        clss = classes[1:-1] if len(classes) == len(paths) else [None] * len(mods)
        return Scope(tuple(mods), tuple(clss))
    name = node.name or ""
    if name.startswith("/"):
        parts = [p for p in name.split("/")[1:-1] if p]
        # `/encoder/layer.0/attention/MatMul` -> encoder, encoder.layer.0, encoder.layer.0.attention
        named = tuple(".".join(parts[: i + 1]) for i in range(len(parts)))
        return Scope(named, (None,) * len(named))
    return Scope((), ())


def scope_named(node: ir.Node) -> bool:
    """Whether the exporter said where `node` belongs (scope metadata, or a `/path/Op`
    name), as opposed to a node an optimiser made (`Attention_0`, `SkipLayerNorm_3`)."""
    return _TORCH_SCOPES in node.metadata_props or (node.name or "").startswith("/")


def user_frame(node: ir.Node) -> str | None:
    """The outermost frame of the node's stack trace: the line in the user's model code."""
    trace = node.metadata_props.get(_TORCH_STACK)
    if not trace:
        return None
    m = re.search(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not m:
        return None
    return f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}"


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node holds in its attributes (an If's branches, a Loop's body)."""
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.value)
    return graphs


def node_inputs(node: ir.Node) -> list[ir.Value]:
    """What `node` reads: its inputs, and the outer values its subgraphs (an If's branches,
    a Loop's or Scan's body, at any depth) refer to by name."""
    found: dict[int, ir.Value] = {id(v): v for v in node.inputs if v is not None}
    pending = subgraphs(node)
    while pending:
        graph = pending.pop()
        local = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
        local |= {id(o) for inner in graph for o in inner.outputs}
        for inner in graph:
            for value in inner.inputs:
                if value is not None and id(value) not in local and value.graph is not graph:
                    found.setdefault(id(value), value)
            pending.extend(subgraphs(inner))
    return list(found.values())


def subgraph_users(nodes: Iterable[ir.Node]) -> Callable[[ir.Value], list[ir.Node]]:
    """`users(value)`: the nodes of `nodes` that use `value`, a node inside a subgraph (an
    If's branch, a Loop's or Scan's body, at any depth) counted as the top-level node that
    holds it, so control flow stays whole with its node."""
    owner: dict[int, ir.Node] = {}
    for top in nodes:
        pending = [top]
        while pending:
            for graph in subgraphs(pending.pop()):
                for inner in graph:
                    owner[id(inner)] = top
                    pending.append(inner)

    def users(value: ir.Value) -> list[ir.Node]:
        found: dict[int, ir.Node] = {}
        for use in value.uses():
            node = owner.get(id(use.node), use.node)
            found[id(node)] = node
        return list(found.values())

    return users


def _literal_list(text: str) -> list[Any]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return list(value) if isinstance(value, (list, tuple)) else []


# ----------------------------------------------------------------------------- shapes


def eval_shape(shape: ir.Shape | None, binding: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape under `binding`; raises `UnresolvedDim` when a dim is unknown."""
    if shape is None:
        raise UnresolvedDim("unknown shape")
    return tuple(eval_dim(d, binding) for d in shape.dims)


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def itemsize(dtype: ir.DataType | None) -> float:
    """Bytes per element (fractional for 4-bit types); 0 when unknown."""
    if dtype is None or dtype == ir.DataType.UNDEFINED:
        return 0.0
    return float(dtype.itemsize)


def value_bytes(value: ir.Value, binding: Mapping[str, int]) -> int:
    """Size in bytes of `value` under `binding`."""
    if value.const_value is not None:
        return int(value.const_value.nbytes)
    return int(numel(eval_shape(value.shape, binding)) * itemsize(value.dtype))


def dims_text(shape: ir.Shape | None) -> list[int | str]:
    """A shape as JSON-able dims: ints, or names/expressions for symbolic ones."""
    if shape is None:
        return []
    return [d if isinstance(d, int) else (d.value or "?") for d in shape.dims]


def binding_from_inputs(graph: ir.Graph, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Bind the graph inputs' symbolic dims to the concrete shapes of example inputs."""
    binding: dict[str, int] = {}
    for value in graph.inputs:
        if value.name is None or value.name not in shapes or value.shape is None:
            continue
        for dim, size in zip(value.shape.dims, shapes[value.name]):
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value.isidentifier():
                binding.setdefault(dim.value, int(size))
    return binding


def index_ranges(model: ir.Model) -> dict[str, tuple[int, int]]:
    """Model inputs that index a table (Gather on an initializer: token ids, token types)
    and the values they may take, [0, rows): what the model itself can look up."""
    ranges: dict[str, tuple[int, int]] = {}
    for value in model.graph.inputs:
        for use in value.uses():
            node = use.node
            if node.op_type == "Gather" and use.idx == 1:
                table = node.inputs[0]
                if table is not None and table.const_value is not None:
                    axis = node.attributes.get_int("axis", 0)
                    rows = int(table.const_value.shape.numpy()[axis])
                    known = ranges.get(value.name or "", (0, rows))[1]
                    ranges[value.name or ""] = (0, min(known, rows))
    return ranges


# ----------------------------------------------------------------------- shape values

# A shape tensor's element: an int, or an expression of dim names (`batch*seq`).
SymInt = int | str
# Shape tensors lamc follows symbolically: small, rank 0 or 1.
_MAX_SHAPE_VALUES = 64


def shape_values(model: ir.Model, names: Iterable[str]) -> dict[str, list[SymInt]]:
    """Values of small integer tensors computed from shapes (Reshape targets and the like),
    as dim expressions: `[batch, seq, 4, 16]`. A stage that receives one across a cut can
    be warmed up with a valid value at any binding. Tensors whose value depends on data, or
    on an operator this does not follow, are left out."""
    memo: dict[int, tuple[int, list[SymInt]] | None] = {}
    producers = {id(v): node for node in model.graph for v in node.outputs}
    found: dict[str, list[SymInt]] = {}
    values = {v.name: v for node in model.graph for v in node.outputs if v.name}
    for name in names:
        value = values.get(name)
        if value is None or (value.dtype is not None and value.dtype not in _INT_TYPES):
            continue
        result = _sym_value(value, producers, memo, 0)
        if result is not None:
            found[name] = result[1]
    return found


_INT_TYPES = {ir.DataType.INT64, ir.DataType.INT32}


def _sym_value(
    value: ir.Value,
    producers: Mapping[int, ir.Node],
    memo: dict[int, tuple[int, list[SymInt]] | None],
    depth: int,
) -> tuple[int, list[SymInt]] | None:
    """(rank, elements) of `value`, or None when it is not a shape computation."""
    key = id(value)
    if key in memo:
        return memo[key]
    memo[key] = None  # cycles and deep chains end here
    result = None
    if depth < 200:
        try:
            result = _sym_compute(value, producers, memo, depth)
        except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError):
            result = None
        if result is not None and len(result[1]) > _MAX_SHAPE_VALUES:
            result = None
    memo[key] = result
    return result


def _const(tensor: Any) -> tuple[int, list[SymInt]] | None:
    array = tensor.numpy()
    if array.dtype.kind not in "iu" or array.ndim > 1 or array.size > _MAX_SHAPE_VALUES:
        return None
    return array.ndim, [int(x) for x in array.reshape(-1)]


def _sym_compute(
    value: ir.Value,
    producers: Mapping[int, ir.Node],
    memo: dict[int, tuple[int, list[SymInt]] | None],
    depth: int,
) -> tuple[int, list[SymInt]] | None:
    if value.const_value is not None:
        return _const(value.const_value)
    node = producers.get(id(value))
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    attrs = node.attributes

    def arg(i: int) -> tuple[int, list[SymInt]] | None:
        source = node.inputs[i] if i < len(node.inputs) else None
        return None if source is None else _sym_value(source, producers, memo, depth + 1)

    if op == "Constant":
        attr = attrs.get("value")
        if attr is not None:
            return _const(attr.as_tensor())
        if "value_int" in attrs:
            return 0, [attrs.get_int("value_int")]
        if "value_ints" in attrs:
            return 1, [int(x) for x in attrs.get_ints("value_ints")]
        return None
    if op == "Shape":
        source = node.inputs[0]
        if source is None or source.shape is None:
            return None
        dims: list[SymInt] = []
        for d in source.shape.dims:
            if isinstance(d, int):
                dims.append(d)
            elif d.value:
                dims.append(d.value)
            else:
                return None
        rank = len(dims)
        start = attrs.get_int("start", 0)
        end = attrs.get_int("end", rank)
        return 1, dims[slice(start, end)]
    if op in ("Identity", "Cast"):
        if op == "Cast" and attrs.get_int("to", 0) not in (ir.DataType.INT64, ir.DataType.INT32):
            return None
        return arg(0)
    if op == "Concat":
        parts = [arg(i) for i in range(len(node.inputs))]
        if any(p is None or p[0] != 1 for p in parts):
            return None
        return 1, [x for p in parts if p is not None for x in p[1]]
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        data = arg(0)
        if data is None:
            return None
        if op == "Squeeze":
            return (0 if len(data[1]) == 1 else 1), data[1]
        return 1, data[1]
    if op == "Gather":
        data, index = arg(0), arg(1)
        if data is None or index is None or attrs.get_int("axis", 0) != 0:
            return None
        if not all(isinstance(i, int) for i in index[1]):
            return None
        return index[0], [data[1][int(i)] for i in index[1]]
    if op == "Slice":
        data, starts, ends = arg(0), arg(1), arg(2)
        axes = arg(3) if len(node.inputs) > 3 else (1, [0])
        steps = arg(4) if len(node.inputs) > 4 else (1, [1])
        if data is None or starts is None or ends is None or axes is None or steps is None:
            return None
        if len(starts[1]) != 1 or axes[1][0] not in (0, -1):
            return None
        lo, hi, stride = starts[1][0], ends[1][0], steps[1][0]
        if not (isinstance(lo, int) and isinstance(hi, int) and isinstance(stride, int)):
            return None
        return 1, data[1][lo:hi:stride]
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = arg(0), arg(1)
        if a is None or b is None:
            return None
        n = max(len(a[1]), len(b[1]))
        if len(a[1]) not in (1, n) or len(b[1]) not in (1, n):
            return None
        out = [
            _sym_binop(op, a[1][i if len(a[1]) > 1 else 0], b[1][i if len(b[1]) > 1 else 0])
            for i in range(n)
        ]
        return max(a[0], b[0]), out
    return None


def _sym_binop(op: str, a: SymInt, b: SymInt) -> SymInt:
    if isinstance(a, int) and isinstance(b, int):
        if op == "Div":
            if b == 0:
                raise ZeroDivisionError
            return int(a / b)  # ONNX integer division truncates toward zero
        return {"Add": a + b, "Sub": a - b, "Mul": a * b}[op]
    if op == "Mul" and (a == 1 or b == 1):
        return b if a == 1 else a
    if op in ("Add", "Sub") and b == 0:
        return a
    symbol = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "//"}[op]
    return f"({a}){symbol}({b})"

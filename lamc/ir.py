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
from collections.abc import Iterable, Mapping
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


def user_frame(node: ir.Node) -> str | None:
    """The outermost frame of the node's stack trace: the line in the user's model code."""
    trace = node.metadata_props.get(_TORCH_STACK)
    if not trace:
        return None
    m = re.search(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not m:
        return None
    return f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}"


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

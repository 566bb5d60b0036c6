"""An ONNX file (with or without external data) -> IR."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lamc.errors import CaptureError, UsageError
from lamc.frontend.capture import Captured
from lamc.ir import index_ranges
from lamc.paths import sha256_file


def capture_onnx(
    path: Path,
    *,
    dynamic_overrides: Mapping[str, tuple[int, int]] | None = None,
    operating_point: Mapping[str, int] | None = None,
) -> Captured:
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    started = time.perf_counter()
    try:
        model = ir.load(path)
    except Exception as exc:
        raise CaptureError(
            f"{path} is not a valid ONNX model: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if len(model.graph) == 0 or not model.graph.outputs:
        what = "empty (0 bytes)" if path.stat().st_size == 0 else "a model without a graph"
        raise CaptureError(
            f"{path} is not a valid ONNX model: it is {what}",
            hint="export the model again; an ONNX model has nodes and at least one output",
        )
    _check_external_data(model, path)
    capture_s = time.perf_counter() - started

    named = _name_anonymous_dims(model)
    symbols = _input_symbols(model)
    overrides = dict(dynamic_overrides or {})
    unknown = sorted(set(overrides) - set(symbols))
    if unknown:
        raise CaptureError(
            f"--dynamic names dim(s) {', '.join(unknown)} that {path} does not have",
            hint=f"its inputs' symbolic dims are: {', '.join(symbols) or 'none'}",
        )
    point = dict(operating_point or {})
    warnings: list[str] = [
        f"input {value!r} axis {axis} has no dim name; lamc names it {symbol!r}"
        for value, axis, symbol in named
    ]
    dims: dict[str, tuple[int, int]] = {}
    for name in symbols:
        low, high = overrides.get(name, (1, 1 << 31))
        dims[name] = (low, high)
        if name not in point:
            point[name] = max(low, 1)
            warnings.append(
                f"dim {name!r} has no example size; using {point[name]} (pass --dims {name}=N)"
            )
    int_ranges = index_ranges(model)
    example: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    from lamc.ir import UnresolvedDim, eval_shape

    for value in model.graph.inputs:
        name = value.name or ""
        try:
            shape = eval_shape(value.shape, point)
        except UnresolvedDim as exc:
            raise CaptureError(
                f"input {name!r} of {path} has a dimension lamc cannot size: {exc}"
            ) from exc
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if "mask" in name.lower() and np.issubdtype(dtype, np.integer):
            example[name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            low, high = int_ranges.get(name, (0, 2))
            example[name] = rng.integers(low, high, size=shape).astype(dtype)
        else:
            example[name] = rng.standard_normal(shape).astype(dtype)
    return Captured(
        model=model,
        name=path.stem,
        source=str(path),
        dims=dims,
        operating_point=point,
        example_inputs=example,
        int_ranges=int_ranges,
        reference=OnnxReference(path),
        capture_s=capture_s,
        warnings=warnings,
        source_sha256=sha256_file(path),
    )


class OnnxReference:
    """The original ONNX file run by ONNX Runtime on the CPU."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._session: object | None = None

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        if self._session is None:
            from lamc.backends.onnxruntime.run import new_session

            self._session = new_session(str(self.path))
        session: ort.InferenceSession = self._session
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, dict(feeds))))


def _anonymous(dim: object) -> bool:
    """A dim that says nothing: no value and no name, the literal "?" some exporters
    write, or a negative size (-1 for "any")."""
    if isinstance(dim, int):
        return dim < 0
    if isinstance(dim, ir.SymbolicDim):
        return dim.value is None or dim.value.strip() in ("", "?")
    return dim is None


def _kept(dim: int | ir.SymbolicDim) -> int | str:
    """A dim that is not anonymous, as `ir.Shape` takes it back."""
    return dim if isinstance(dim, int) else str(dim.value)


def _name_anonymous_dims(model: ir.Model) -> list[tuple[str, int, str]]:
    """Give each anonymous dim of each graph input a symbol of its own (`INPUT_AXIS`),
    so two unknown sizes are never taken for one; anonymous dims of every other value
    are forgotten, to be inferred from the inputs. Returns (input, axis, symbol) made."""
    taken = {
        d.value
        for v in model.graph.inputs
        if v.shape is not None
        for d in v.shape.dims
        if isinstance(d, ir.SymbolicDim) and d.value
    }
    made: list[tuple[str, int, str]] = []
    for value in model.graph.inputs:
        if value.shape is None or not any(_anonymous(d) for d in value.shape.dims):
            continue
        base = "".join(c if c.isalnum() else "_" for c in (value.name or "input")) or "input"
        if not base[0].isalpha():
            base = "x" + base
        dims: list[int | str | None] = []
        for axis, dim in enumerate(value.shape.dims):
            if not _anonymous(dim):
                dims.append(_kept(dim))
                continue
            symbol, n = f"{base}_{axis}", 1
            while symbol in taken:
                symbol, n = f"{base}_{axis}_{n}", n + 1
            taken.add(symbol)
            made.append((value.name or "", axis, symbol))
            dims.append(symbol)
        value.shape = ir.Shape(dims)
    inputs = {id(v) for v in model.graph.inputs}
    for value in [*model.graph.outputs, *(o for node in model.graph for o in node.outputs)]:
        if id(value) in inputs or value.shape is None:
            continue
        if any(_anonymous(d) for d in value.shape.dims):
            value.shape = ir.Shape([None if _anonymous(d) else _kept(d) for d in value.shape.dims])
    return made


def _input_symbols(model: ir.Model) -> list[str]:
    found: list[str] = []
    for value in model.graph.inputs:
        for dim in value.shape.dims if value.shape is not None else ():
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in found:
                found.append(dim.value)
    return found


def _tensors(model: ir.Model) -> Iterator[tuple[str, object]]:
    """Every tensor the model holds: initializers of the graph and of every subgraph
    (If, Loop, Scan, functions), and tensor attributes of every node (Constant)."""
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    while graphs:
        graph = graphs.pop()
        if isinstance(graph, ir.Graph):
            for init in graph.initializers.values():
                yield f"initializer {init.name!r}", init.const_value
        for node in graph:
            for attr in node.attributes.values():
                kind = attr.type
                if kind == ir.AttributeType.TENSOR:
                    yield f"attribute {attr.name!r} of node {node.name!r}", attr.value
                elif kind == ir.AttributeType.TENSORS:
                    for tensor in attr.value:
                        yield f"attribute {attr.name!r} of node {node.name!r}", tensor
                elif kind == ir.AttributeType.GRAPH:
                    graphs.append(attr.value)
                elif kind == ir.AttributeType.GRAPHS:
                    graphs.extend(attr.value)


def _check_external_data(model: ir.Model, path: Path) -> None:
    """External data must stay beside the model: no absolute paths, no `..`, no symlinks,
    for every tensor with external data, in every subgraph and node attribute."""
    base = path.parent.resolve()
    for what, tensor in _tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = tensor.location
        target = (base / location).resolve()
        if (
            os.path.isabs(location)
            or ".." in Path(location).parts
            or not target.is_relative_to(base)
        ):
            raise CaptureError(f"{path}: {what} points outside the model directory ({location})")
        if (base / location).is_symlink():
            raise CaptureError(f"{path}: external data {location} is a symlink")
        if not target.is_file():
            raise CaptureError(f"{path}: external data file {location} of {what} is missing")
        end = (tensor.offset or 0) + (tensor.length or 0)
        if end > target.stat().st_size:
            raise CaptureError(
                f"{path}: external data {location} is truncated ({what} needs bytes up to {end})"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""

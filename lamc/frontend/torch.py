"""torch.nn.Module -> IR, through torch.export and the dynamo ONNX exporter."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lamc.errors import CaptureError
from lamc.frontend.capture import Captured
from lamc.models.spec import Dim, ModelSpec

# torch.onnx logs a warning per missing torchvision operator at import; not lamc's concern.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_USER_CALL = re.compile(
    r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)'
)
_INTERNAL_PATHS = (
    "site-packages",
    "dist-packages",
    "/torch/",
    "/lamc/",
    "<frozen",
    "/contextlib.py",
)
OPSET = 18


def capture_spec(
    spec: ModelSpec,
    *,
    source: str,
    dynamic_overrides: Mapping[str, tuple[int, int]] | None = None,
) -> Captured:
    """Export `spec.module` at its example inputs with its dynamic dims into the IR."""
    module = spec.module.eval()
    dims = _apply_overrides(spec.dims(), dynamic_overrides or {}, source)
    weightless = any(p.device.type == "meta" for p in module.parameters())
    started = time.perf_counter()
    exported = _torch_export(module, spec, dims)
    # The exporter's optimiser folds constants, which reads weights: off without them.
    onnx_program = _to_onnx(exported, spec, optimize=not weightless)
    capture_s = time.perf_counter() - started
    model = onnx_program.model
    model.producer_name = "lamc"
    _rename_dims(model, spec)
    example = {name: _numpy(t) for name, t in spec.example_inputs.items()}
    operating_point = {name: int(size) for name, size in spec.operating_point.items()}
    for name in dims:
        operating_point.setdefault(name, _example_size(spec, name))
    return Captured(
        model=model,
        name=spec.name,
        source=source,
        dims={name: (dim.min, dim.max) for name, dim in sorted(dims.items())},
        operating_point=operating_point,
        example_inputs=example,
        int_ranges=dict(spec.int_ranges),
        reference=None
        if weightless
        else TorchReference(
            module, list(spec.example_inputs), [v.name or "" for v in model.graph.outputs]
        ),
        capture_s=capture_s,
        kv_cache=spec.kv_cache,
        has_weights=not weightless,
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.device.type == "meta":
        return np.zeros(
            tuple(tensor.shape), dtype=torch.empty((), dtype=tensor.dtype).numpy().dtype
        )
    return tensor.detach().cpu().numpy()


def _rename_dims(model: Any, spec: ModelSpec) -> None:
    """Exporting an ExportedProgram names dims s0, s1, ...; give them the spec's names."""
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    for value in model.graph.inputs:
        axes = spec.dynamic.get(value.name or "", {})
        if value.shape is None:
            continue
        for axis, dim in axes.items():
            sym = value.shape.dims[axis]
            if isinstance(sym, ir.SymbolicDim) and sym.value and sym.value.isidentifier():
                mapping.setdefault(sym.value, dim.name)
    if not mapping:
        return
    token = re.compile(
        r"\b(" + "|".join(map(re.escape, sorted(mapping, key=len, reverse=True))) + r")\b"
    )

    def rename(value: Any) -> None:
        if value is None or value.shape is None:
            return
        dims = value.shape.dims
        if not any(isinstance(d, ir.SymbolicDim) and d.value for d in dims):
            return
        value.shape = ir.Shape(
            [
                ir.SymbolicDim(token.sub(lambda m: mapping[m.group(1)], d.value))
                if isinstance(d, ir.SymbolicDim) and d.value
                else d
                for d in dims
            ]
        )

    for value in model.graph.inputs:
        rename(value)
    for node in model.graph:
        for value in node.outputs:
            rename(value)


class TorchReference:
    """The source module as a function of numpy inputs (the reference semantics)."""

    def __init__(
        self, module: torch.nn.Module, input_names: list[str], output_names: list[str]
    ) -> None:
        self.module = module
        self.input_names = input_names
        self.output_names = output_names

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.require(feeds[n], requirements="C")) for n in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        flat = list(_flatten(out))
        return {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, flat)}


def _flatten(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _flatten(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _flatten(item)
    elif hasattr(out, "to_tuple"):
        yield from _flatten(out.to_tuple())


def _example_size(spec: ModelSpec, dim_name: str) -> int:
    for name, axes in spec.dynamic.items():
        for axis, dim in axes.items():
            if dim.name == dim_name:
                return int(spec.example_inputs[name].shape[axis])
    raise CaptureError(f"dim {dim_name!r} is not used by any input")


def _apply_overrides(
    dims: dict[str, Dim], overrides: Mapping[str, tuple[int, int]], source: str
) -> dict[str, Dim]:
    unknown = sorted(set(overrides) - set(dims))
    if unknown:
        raise CaptureError(
            f"--dynamic names dim(s) {', '.join(unknown)} that {source} does not have",
            hint=f"its dynamic dims are: {', '.join(sorted(dims)) or 'none'}",
        )
    return {
        name: Dim(name, *overrides[name]) if name in overrides else dim
        for name, dim in dims.items()
    }


def _dynamic_shapes(
    module: torch.nn.Module, spec: ModelSpec, dims: dict[str, Dim]
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """Arguments and dynamic_shapes laid out the way `module.forward` binds them."""
    torch_dims = {name: torch.export.Dim(name, min=d.min, max=d.max) for name, d in dims.items()}
    per_input = {
        name: {axis: torch_dims[d.name] for axis, d in spec.dynamic.get(name, {}).items()} or None
        for name in spec.example_inputs
    }
    params = inspect.signature(module.forward).parameters
    names = list(spec.example_inputs)
    if all(n in params for n in names) and not any(
        p.kind is p.VAR_POSITIONAL for p in params.values()
    ):
        return (), dict(spec.example_inputs), {n: per_input[n] for n in names}
    # Positional: plain parameters first, the rest collected by *args as one tuple.
    shapes: list[Any] = []
    i = 0
    for param in params.values():
        if param.kind is param.VAR_POSITIONAL:
            if i < len(names):
                shapes.append(tuple(per_input[n] for n in names[i:]))
                i = len(names)
            break
        if i < len(names):
            shapes.append(per_input[names[i]])
            i += 1
    return tuple(spec.example_inputs.values()), {}, tuple(shapes)


def _torch_export(
    module: torch.nn.Module, spec: ModelSpec, dims: dict[str, Dim]
) -> torch.export.ExportedProgram:
    args, kwargs, dynamic_shapes = _dynamic_shapes(module, spec, dims)
    try:
        with _quiet(), torch.no_grad():
            return torch.export.export(
                module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False
            )
    except Exception as exc:
        raise capture_failure(exc, f"torch.export could not capture {spec.name}") from exc


def _to_onnx(
    exported: torch.export.ExportedProgram, spec: ModelSpec, *, optimize: bool = True
) -> Any:
    try:
        with _quiet():
            return torch.onnx.export(
                exported,
                (),
                dynamo=True,
                input_names=list(spec.example_inputs),
                output_names=spec.output_names,
                opset_version=OPSET,
                optimize=optimize,
                verbose=False,
                report=False,
            )
    except Exception as exc:
        raise capture_failure(exc, f"the ONNX exporter could not translate {spec.name}") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch prints graph listings and warnings while exporting; the user sees lamc's summary."""
    loggers = [
        logging.getLogger(n)
        for n in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture_failure(exc: BaseException, what: str) -> CaptureError:
    """A one-line CaptureError with torch's reason and the user's source line."""
    chain = _exception_chain(exc)
    root = chain[-1]
    reason = _first_line(str(root)) or type(root).__name__
    kind = type(root).__name__
    where = None
    for item in chain:
        m = _USER_CALL.search(_ANSI.sub("", str(item)))
        if m:
            where = f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}"
            break
    if where is None:
        where = user_source_line(root) or user_source_line(exc)
    hint = None
    if "data-dependent" in reason or "GuardOnDataDependent" in kind:
        hint = "torch.export cannot branch on tensor values; use torch.cond or move the branch out of forward"
    message = f"{what}: {kind}: {reason}"
    if where:
        message += f" (at {where})"
    return CaptureError(message, hint=hint)


def user_source_line(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch and lamc: the user's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if not any(part in path for part in _INTERNAL_PATHS) or _is_user_models_dir(path):
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return None


def _is_user_models_dir(path: str) -> bool:
    # The zoo is lamc's own code but is "the model code" from the user's point of view.
    return "/models/" in path and Path(path).parent.name == "models"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    seen = {id(exc)}
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or id(nxt) in seen:
            return chain
        seen.add(id(nxt))
        chain.append(nxt)


def _first_line(text: str) -> str:
    for line in _ANSI.sub("", text).splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return ""

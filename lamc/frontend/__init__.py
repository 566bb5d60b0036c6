"""Frontends: turn what the user names as MODEL into the IR.

MODEL is one of
  zoo:NAME[:CONFIG]          a model from lamc's zoo (`zoo:gpt2`, `zoo:gpt2:test,kv=1`)
  path/to/file.py:factory    a factory function in a Python file
  pkg.module:factory         a factory function in an importable module
  DIR                        a Hugging Face checkpoint directory (config.json + safetensors)
  file.onnx                  an ONNX model, with or without external data
  file.pt2                   a saved torch.export program (pickle: needs --trust-pickle)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamc.errors import CaptureError, UsageError, missing_extra
from lamc.frontend.capture import Captured, random_inputs

__all__ = ["CaptureOptions", "Captured", "capture", "random_inputs"]


@dataclass
class CaptureOptions:
    # --dynamic batch=1:8,seq=1:2048
    dynamic: dict[str, tuple[int, int]] = field(default_factory=dict)
    # --dims batch=1,seq=128 (the operating point to analyse and plan for)
    dims: dict[str, int] = field(default_factory=dict)
    trust_pickle: bool = False
    # False: build the model on PyTorch's meta device and capture shapes only (no weights
    # are allocated). Enough to inspect and plan a model larger than this machine's memory.
    weights: bool = True
    # Hugging Face causal LMs: capture with the KV cache as inputs and outputs.
    kv_cache: bool = False
    # A LoRA adapter or full weights (what `lamc train` writes) applied before capture.
    adapter: Path | None = None
    # Checkpoint directories: load as a sequence classifier with this many classes.
    labels: int | None = None


def capture(ref: str, options: CaptureOptions | None = None) -> Captured:
    """Capture MODEL `ref` into the IR; raises a LamcError naming what went wrong."""
    options = options or CaptureOptions()
    try:
        import torch  # noqa: F401
    except ImportError:
        if not ref.endswith(".onnx"):
            raise missing_extra("torch", "compile") from None
    if options.kv_cache and not Path(ref).is_dir():
        raise UsageError(
            "--kv-cache applies to Hugging Face checkpoint directories",
            hint="zoo decoders take kv=1 (zoo:gpt2:small,kv=1); your own modules return their cache",
        )
    if options.adapter is not None and (ref.endswith((".onnx", ".pt2"))):
        raise UsageError(
            f"--adapter applies to PyTorch sources (zoo, factory, checkpoint directory), not {ref}"
        )
    if options.adapter is not None and not options.weights:
        raise UsageError("--adapter needs the model's weights: leave out --no-weights")
    captured = _capture(ref, options)
    for name, size in options.dims.items():
        if name not in captured.dims:
            raise UsageError(
                f"--dims names {name!r}, which is not a dynamic dim of {ref}",
                hint=f"its dynamic dims are: {', '.join(sorted(captured.dims)) or 'none'}",
            )
        low, high = captured.dims[name]
        if not low <= size <= high:
            raise UsageError(f"--dims {name}={size} is outside its range {low}:{high}")
        captured.operating_point[name] = size
    return captured


def _capture(ref: str, options: CaptureOptions) -> Captured:
    if ref.startswith("zoo:"):
        return _capture_zoo(ref, options)
    path = Path(ref)
    if ref.endswith(".onnx"):
        from lamc.frontend.onnx import capture_onnx

        return capture_onnx(path, dynamic_overrides=options.dynamic, operating_point=options.dims)
    if ref.endswith(".pt2"):
        return _capture_pt2(path, options)
    if path.is_dir():
        return _capture_hf(path, options)
    if ":" in ref:
        return _capture_factory(ref, options)
    if not path.exists():
        raise UsageError(
            f"model {ref!r} not found",
            hint="MODEL is zoo:NAME, file.py:factory, pkg.module:factory, a checkpoint directory or a .onnx file",
        )
    raise UsageError(
        f"cannot tell what kind of model {ref!r} is",
        hint="MODEL is zoo:NAME, file.py:factory, pkg.module:factory, a checkpoint directory or a .onnx file",
    )


def _capture_zoo(ref: str, options: CaptureOptions) -> Captured:
    from lamc import models
    from lamc.frontend.torch import capture_spec

    _, name, *rest = ref.split(":", 2)
    config = rest[0] if rest else None
    if name not in models.ZOO:
        raise UsageError(
            f"unknown zoo model {name!r}", hint=f"the zoo has: {', '.join(sorted(models.ZOO))}"
        )
    try:
        if options.weights:
            spec = models.build(name, config)
        else:
            import torch

            with torch.device("meta"):
                spec = models.build(name, config)
            spec.example_inputs = {k: v.to("meta") for k, v in spec.example_inputs.items()}
    except ValueError as exc:
        raise UsageError(f"{ref}: {exc}") from exc
    reference = _adapt(spec, options)
    captured = capture_spec(spec, source=ref, dynamic_overrides=options.dynamic)
    return _adapted(captured, reference, options)


def _capture_factory(ref: str, options: CaptureOptions) -> Captured:
    from lamc.frontend.torch import capture_spec

    spec = factory_spec(ref, weights=options.weights)
    if not options.weights:
        spec.example_inputs = {k: v.to("meta") for k, v in spec.example_inputs.items()}
    reference = _adapt(spec, options)
    captured = capture_spec(spec, source=ref, dynamic_overrides=options.dynamic)
    return _adapted(captured, reference, options)


def factory_spec(ref: str, *, weights: bool = True) -> Any:
    """Import a factory (`file.py:name` or `pkg.module:name`) and call it: its ModelSpec
    (built on PyTorch's meta device without `weights`)."""
    from lamc.frontend.torch import user_source_line

    target, _, attr = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"model file {path} does not exist")
        module_name = "lamc_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except SystemExit as exc:
            raise CaptureError(f"importing {path} called sys.exit({exc.code!r})") from None
        except Exception as exc:
            where = user_source_line(exc)
            raise CaptureError(
                f"importing {path} raised {type(exc).__name__}: {exc}"
                + (f" (at {where})" if where else "")
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UsageError(f"cannot import module {target!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{target} has no callable {attr!r}")
    import contextlib

    import torch

    placement = contextlib.nullcontext() if weights else torch.device("meta")
    try:
        with placement:
            result = factory(None) if _takes_argument(factory) else factory()
    except SystemExit as exc:
        # A factory's own exit would end lamc with its status and no final line.
        raise CaptureError(
            f"factory {ref} called sys.exit({exc.code!r}) instead of returning a model"
        ) from None
    except Exception as exc:
        where = user_source_line(exc)
        raise CaptureError(
            f"factory {ref} raised {type(exc).__name__}: {exc}"
            + (f" (at {where})" if where else "")
        ) from exc
    return _as_spec(result, ref)


def _capture_hf(path: Path, options: CaptureOptions) -> Captured:
    from lamc.frontend.hf import spec_from_checkpoint
    from lamc.frontend.torch import capture_spec

    labels = options.labels
    if labels is None and options.adapter is not None:
        from lamc.frontend import adapter

        labels = adapter.classes(options.adapter)
    spec = spec_from_checkpoint(
        path, trust_pickle=options.trust_pickle, kv_cache=options.kv_cache, labels=labels
    )
    reference = _adapt(spec, options)
    captured = _adapted(
        capture_spec(spec, source=str(path), dynamic_overrides=options.dynamic), reference, options
    )
    from lamc.verify import files_sha256

    captured.source_sha256 = files_sha256(
        sorted([*path.glob("*.safetensors"), path / "config.json"])
    )
    return captured


def _adapt(spec: Any, options: CaptureOptions) -> Any:
    """Apply `--adapter` to the spec's module; the module to validate against, if any."""
    if options.adapter is None:
        return None
    from lamc.frontend import adapter

    spec.module, reference = adapter.apply(spec.module, options.adapter)
    from lamc.frontend.prompt import PromptTuned

    if isinstance(spec.module, PromptTuned):
        _make_room_for_prompt(spec, spec.module.tokens, options)
    return reference


def _make_room_for_prompt(spec: Any, tokens: int, options: CaptureOptions) -> None:
    """A soft prompt of `tokens` takes positions of the model's context: the token
    axis's range shrinks by as many."""
    import dataclasses

    if spec.kv_cache is not None:
        raise UsageError(
            f"--adapter {options.adapter}: a soft prompt with --kv-cache is not built; "
            "compile without --kv-cache"
        )
    for name, axes in spec.dynamic.items():
        dim = axes.get(1)
        if dim is None:
            continue
        if dim.max - tokens < max(dim.min, 1):
            raise UsageError(
                f"--adapter {options.adapter}: its {tokens} virtual tokens leave no room "
                f"for {name} (at most {dim.max} positions)"
            )
        axes[1] = dataclasses.replace(dim, max=dim.max - tokens)
        example = spec.example_inputs.get(name)
        if example is not None and example.shape[1] > dim.max - tokens:
            spec.example_inputs[name] = example[:, : dim.max - tokens]


def _adapted(captured: Captured, reference: Any, options: CaptureOptions) -> Captured:
    """Record the adapter; the reference becomes the adapted source as trained (for LoRA,
    the peft model, unmerged)."""
    if options.adapter is None:
        return captured
    from lamc.frontend import adapter
    from lamc.frontend.torch import TorchReference

    path = adapter.resolve(options.adapter)
    captured.adapter = str(path)
    captured.adapter_sha256 = adapter.digest(path)
    if captured.reference is not None:
        old = captured.reference
        assert isinstance(old, TorchReference)
        captured.reference = TorchReference(reference, old.input_names, old.output_names)
    return captured


def _capture_pt2(path: Path, options: CaptureOptions) -> Captured:
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    if not options.trust_pickle:
        raise CaptureError(
            f"{path} is a pickled torch.export program, which can run code when loaded",
            hint="pass --trust-pickle if you trust this file",
        )
    import torch

    from lamc.models.spec import ModelSpec

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise CaptureError(
            f"{path} is not a loadable torch.export program: {type(exc).__name__}: {exc}"
        ) from exc
    args, kwargs = program.example_inputs or ((), {})
    inputs = {f"input_{i}": t for i, t in enumerate(args)} | dict(kwargs)
    spec = ModelSpec(module=program.module(), example_inputs=inputs, name=path.stem)
    return __import__("lamc.frontend.torch", fromlist=["capture_spec"]).capture_spec(
        spec, source=str(path)
    )


def _takes_argument(factory: Any) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _as_spec(result: Any, ref: str) -> Any:
    """Accept a ModelSpec or the tuple (module, example_inputs, dynamic)."""
    import torch

    from lamc.models.spec import Dim, ModelSpec

    if isinstance(result, ModelSpec):
        return result
    if not (
        isinstance(result, tuple)
        and len(result) in (2, 3)
        and isinstance(result[0], torch.nn.Module)
    ):
        raise CaptureError(
            f"factory {ref} returned {type(result).__name__}",
            hint="a factory returns lamc.models.ModelSpec or (module, example_inputs, dynamic)",
        )
    module, inputs = result[0], result[1]
    dynamic_raw: Mapping[str, Mapping[int, Any]] = result[2] if len(result) == 3 else {}
    if isinstance(inputs, (tuple, list)):
        names = [p for p in inspect.signature(module.forward).parameters][: len(inputs)]
        inputs = dict(zip(names, inputs))
    dynamic: dict[str, dict[int, Dim]] = {}
    for name, axes in (dynamic_raw or {}).items():
        dynamic[name] = {}
        for axis, dim in axes.items():
            if isinstance(dim, Dim):
                dynamic[name][int(axis)] = dim
            elif isinstance(dim, (tuple, list)) and len(dim) == 3:
                dynamic[name][int(axis)] = Dim(str(dim[0]), int(dim[1]), int(dim[2]))
            else:
                raise CaptureError(
                    f"factory {ref}: dynamic dim {name}[{axis}] must be Dim(name, min, max) or (name, min, max)"
                )
    return ModelSpec(
        module=module, example_inputs=dict(inputs), dynamic=dynamic, name=module.__class__.__name__
    )

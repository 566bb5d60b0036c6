"""What every frontend returns: the IR plus what later steps need to know of the source."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lamc.models.spec import KVCacheSpec

# Runs the source model (torch module, original ONNX file) on numpy inputs: the
# reference that `lamc validate` compares a compiled pipeline against.
Reference = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Captured:
    """A model captured into the IR."""

    model: ir.Model
    name: str
    source: str
    # Dynamic dims: name -> inclusive (min, max).
    dims: dict[str, tuple[int, int]]
    # The shape to analyse and plan for: dim name -> size.
    operating_point: dict[str, int]
    example_inputs: dict[str, np.ndarray]
    # Value range [low, high) of integer inputs, for drawing valid random inputs.
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    reference: Reference | None = None
    capture_s: float = 0.0
    kv_cache: KVCacheSpec | None = None
    warnings: list[str] = field(default_factory=list)
    # sha256 of the source files when the model came from files (ONNX, checkpoint dir).
    source_sha256: str | None = None
    # False for a shapes-only capture (--no-weights): fine to plan, not to compile.
    has_weights: bool = True
    # `--adapter`: the fine-tuning result applied before capture, and its files' sha256.
    adapter: str | None = None
    adapter_sha256: str | None = None

    @property
    def input_names(self) -> list[str]:
        return [v.name or "" for v in self.model.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name or "" for v in self.model.graph.outputs]


def random_inputs(
    captured: Captured, binding: Mapping[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random inputs at `binding`, integers inside their declared value ranges."""
    from lamc.ir import eval_shape

    feeds: dict[str, np.ndarray] = {}
    for value in captured.model.graph.inputs:
        name = value.name or ""
        shape = eval_shape(value.shape, binding)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.integer):
            low, high = captured.int_ranges.get(name, (0, 2))
            feeds[name] = rng.integers(low, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds

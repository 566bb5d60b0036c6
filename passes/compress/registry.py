"""The compression methods, defined once: each is one module of this package and one
entry here (its name, what it does to cost, and the function that applies it).

Everything else reads this table: `--compress` parsing and its help, the planner's
method-aware cost tables (`lamc.cost.MethodCost`), the order `--compress auto` steps back
along, and the stage pass that the compile driver runs between slicing and building.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from lamc.cost import FP32, MethodCost
from lamc.passes.compress.common import CompressionError, Options
from lamc.passes.compress.fp16 import fp16
from lamc.passes.compress.int4_weight import int4_weight
from lamc.passes.compress.int8_dynamic import int8_dynamic
from lamc.passes.compress.int8_static import int8_static
from lamc.passes.compress.lowrank import lowrank

Samples = list[dict[str, np.ndarray]]
Apply = Callable[[onnx.ModelProto, Options, Samples], onnx.ModelProto]


def _identity(model: onnx.ModelProto, options: Options, samples: Samples) -> onnx.ModelProto:
    return model


@dataclass(frozen=True)
class Method:
    name: str
    cost: MethodCost  # weight bytes per fp32 byte, and the dtype its MatMuls run in
    apply: Apply
    # Uses calibration samples (each stage's arriving tensors): activation ranges
    # (int8-static) and outlier detection (both int8 methods).
    calibrated: bool = False


# Most precise first: where the accuracy budget is broken, lamc steps back along this list.
# int4: 4 bits plus one fp32 scale per block of 32.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fp32", FP32, _identity),
        Method("fp16", MethodCost("fp16", 0.5, "fp16"), fp16),
        Method("int8-static", MethodCost("int8-static", 0.25, "int8"), int8_static, True),
        Method("int8-dynamic", MethodCost("int8-dynamic", 0.25, "int8"), int8_dynamic, True),
        Method("int4-weight", MethodCost("int4-weight", (4 + 32 / 32) / 32, "int4"), int4_weight),
        Method("lowrank", MethodCost("lowrank", 0.6, "fp32"), lowrank),
    )
}
PRECISION_ORDER = tuple(METHODS)
CALIBRATED = tuple(name for name, m in METHODS.items() if m.calibrated)


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise CompressionError(
            f"unknown compression {name!r}; methods: {', '.join(METHODS)}"
        ) from None


def compress(
    model: onnx.ModelProto,
    name: str,
    options: Options | None = None,
    calibration: Samples | None = None,
) -> onnx.ModelProto:
    """`model` (weights inline) compressed with method `name`; the input is not modified.
    `calibration`: samples of the model's inputs (the int8 methods)."""
    return method(name).apply(model, options or Options(), calibration or [])

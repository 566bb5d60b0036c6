"""int8-dynamic: MatMul/Gemm/Gather weights int8 per channel (7-bit range), activations
quantised per call; outlier input channels split off into a float32 MatMul.

Weights use a 7-bit range (`reduce_range`): x86 CPUs without VNNI multiply u8 x s8 with
16-bit intermediate sums (VPMADDUBSW) that saturate at the full 8-bit range.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from lamc.passes.compress.common import Options
from lamc.passes.compress.outliers import prepare_int8, record


def int8_dynamic(
    model: onnx.ModelProto, options: Options, samples: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, plan = prepare_int8(model, samples, options.outlier_ratio)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(
            model,
            out,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            nodes_to_exclude=plan.kept + plan.fp32_parts,
            extra_options={"MatMulConstBOnly": True},
        )
        return record(onnx.load(str(out)), plan)

"""fp16: weights and compute in float16, statistics and normalisations kept in float32."""

from __future__ import annotations

import numpy as np
import onnx

from lamc.passes.compress.common import Options, toposort

FP32_OPS = [
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Erf",
    "Exp",
    "Range",
    "CumSum",
]


def fp16(
    model: onnx.ModelProto, options: Options, samples: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
    from onnxruntime.transformers import float16

    # The converter casts the inputs of the ops kept in float32 by the types it reads in
    # value_info: a value without one would reach such an op in float16, which is invalid.
    typed = {v.name for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    if any(o not in typed for n in model.graph.node for o in n.output if o):
        model = onnx.shape_inference.infer_shapes(model)
    converted: onnx.ModelProto = float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)),
        disable_shape_infer=True,
    )
    # Intermediate type annotations are stale after the conversion: let ONNX infer them.
    del converted.graph.value_info[:]
    return toposort(converted)

"""int4-weight: MatMul weights 4-bit in blocks of 32 (or 128) with fp32 scales (MatMulNBits)."""

from __future__ import annotations

import numpy as np
import onnx

from lamc.passes.compress.common import CompressionError, Options, fold_transposed_weights


def int4_weight(
    model: onnx.ModelProto, options: Options, samples: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if options.block_size not in (32, 64, 128):
        raise CompressionError(f"int4-weight block size {options.block_size}: use 32 or 128")
    quantizer = MatMulNBitsQuantizer(
        fold_transposed_weights(onnx.ModelProto.FromString(model.SerializeToString())),
        bits=4,
        block_size=options.block_size,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    result: onnx.ModelProto = quantizer.model.model
    return result

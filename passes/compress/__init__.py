"""Compression of one stage's model: fp16, int8 (dynamic, static), int4 weight-only, low-rank.

Each method maps an ONNX model to a smaller one computing (nearly) the same function; the
stage's inputs and outputs keep their dtypes, so the stage boundaries stay as the
manifest says. ONNX Runtime's quantisation tools and onnxconverter-common do the work
where they can; the low-rank factorisation is lamc's own.

| method        | weights                     | compute                                  |
|---------------|-----------------------------|------------------------------------------|
| fp32          | as captured                 | as captured                              |
| fp16          | float16                     | float16, but LayerNorm/Softmax/reductions and the stage's inputs and outputs in float32 |
| int8-dynamic  | MatMul/Gemm/Gather weights int8 per channel (7-bit range) | activations quantised per call (DynamicQuantizeMatMul / MatMulInteger) |
| int8-static   | QDQ: weights int8 per channel (7-bit range) | activations int8 with ranges from calibration inputs |
| int4-weight   | MatMul weights 4-bit, blocks of 32 (or 128), fp32 scales | MatMulNBits (dequantised in the kernel) |
| lowrank       | large MatMul weights W ~ A @ B (SVD, rank by retained energy) | two MatMuls |

Each method is one module here and one entry in `registry.METHODS`; `CompressStage` runs
one on a stage's IR. Activation outliers (both int8 methods) are handled in `outliers`.
"""

from lamc.passes.compress.common import CompressionError, Options
from lamc.passes.compress.outliers import OutlierPlan, outlier_handling, outlier_ratios
from lamc.passes.compress.registry import CALIBRATED, METHODS, PRECISION_ORDER, compress
from lamc.passes.compress.stage import CompressStage

__all__ = [
    "CALIBRATED",
    "METHODS",
    "PRECISION_ORDER",
    "CompressStage",
    "CompressionError",
    "Options",
    "OutlierPlan",
    "compress",
    "outlier_handling",
    "outlier_ratios",
]

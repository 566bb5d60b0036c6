"""int8-static: QDQ with weights int8 per channel (7-bit range) and activation ranges from
calibration inputs; MatMuls with activation outliers stay whole in float32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lamc.passes.compress.common import CompressionError, Options, weighted_matmuls
from lamc.passes.compress.outliers import prepare_int8, record


def int8_static(
    model: onnx.ModelProto, options: Options, calibration: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
    """QDQ int8 with activation ranges from `calibration`. ONNX Runtime's calibrator makes
    sessions of its own, which a process using one global thread pool (lamc's multi-stage
    executor) cannot create: it runs in a fresh child process."""
    if not calibration:
        raise CompressionError("int8-static needs calibration inputs")
    import concurrent.futures
    import multiprocessing

    # No channel splitting: the bulk's range would still be fixed at calibration, and on
    # MiniLM splitting measured worse than keeping those MatMuls whole (worst sentence
    # cosine 0.983 vs 0.996).
    model, plan = prepare_int8(model, calibration, options.static_outlier_ratio, max_split=0)
    skip = set(plan.kept + plan.fp32_parts)
    quantized = [n.name for n in weighted_matmuls(model) if n.name not in skip]
    with tempfile.TemporaryDirectory() as tmp:
        src, out, data = Path(tmp) / "in.onnx", Path(tmp) / "q.onnx", Path(tmp) / "cal.npz"
        onnx.save_model(
            model,
            str(src),
            save_as_external_data=True,
            location="in.onnx.data",
            size_threshold=1024,
        )
        names = [i.name for i in model.graph.input]
        arrays: dict[str, Any] = {
            f"{k}/{n}": s[n] for k, s in enumerate(calibration) for n in names
        }
        np.savez(data, **arrays)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            pool.submit(_int8_static_files, str(src), str(out), str(data), quantized).result()
        return record(onnx.load(str(out)), plan)


def _int8_static_files(src: str, out: str, data: str, nodes: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(src)
    arrays = np.load(data)
    samples: dict[str, dict[str, np.ndarray]] = {}
    for key in arrays.files:
        index, _, name = key.partition("/")
        samples.setdefault(index, {})[name] = arrays[key]
    ordered = [samples[k] for k in sorted(samples, key=int)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(ordered)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.samples, None)

    # `nodes`: weight MatMuls only (attention's activation x activation products, softmax
    # probabilities above all, lose too much in int8), less those with activation outliers.
    quantize_static(
        model,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_quantize=nodes,
        extra_options={"MatMulConstBOnly": True},
    )

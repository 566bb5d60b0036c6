"""Compression of one stage's model: fp16, int8 (dynamic), int4 weight-only, low-rank.

Each method maps an ONNX model to a smaller one computing (nearly) the same function; the
stage's inputs and outputs keep their dtypes, so the stage boundaries stay as the
manifest says. ONNX Runtime's quantisation tools and onnxconverter-common do the work
where they can; the low-rank factorisation is lamc's own.

| method        | weights                     | compute                                  |
|---------------|-----------------------------|------------------------------------------|
| fp32          | as captured                 | as captured                              |
| fp16          | float16                     | float16, but LayerNorm/Softmax/reductions and the stage's inputs and outputs in float32 |
| int8-dynamic  | MatMul/Gemm/Gather weights int8 per channel | activations quantised per call (DynamicQuantizeMatMul / MatMulInteger) |
| int8-static   | QDQ: weights int8 per channel | activations int8 with ranges from calibration inputs |
| int4-weight   | MatMul weights 4-bit, blocks of 32 (or 128), fp32 scales | MatMulNBits (dequantised in the kernel) |
| lowrank       | large MatMul weights W ~ A @ B (SVD, rank by retained energy) | two MatMuls |
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lamc.precision import METHODS, CompressionError

# Methods that need calibration inputs (each stage's arriving tensors).
CALIBRATED = ("int8-static",)
# Ops that stay in float32 under fp16: statistics and normalisations that overflow or lose
# too much in half precision.
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


@dataclass(frozen=True)
class Options:
    block_size: int = 32  # int4-weight: 32 or 128
    energy: float = 0.99  # lowrank: fraction of the squared singular values kept
    min_dim: int = 256  # lowrank / int4: leave smaller weights as they are


def compress(
    model: onnx.ModelProto,
    method: str,
    options: Options | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """`model` (weights inline) compressed with `method`; the input is not modified.
    `calibration`: samples of the model's inputs (int8-static)."""
    options = options or Options()
    if method not in METHODS:
        raise CompressionError(f"unknown compression {method!r}; methods: {', '.join(METHODS)}")
    if method == "fp32":
        return model
    if method == "fp16":
        return _fp16(model)
    if method == "int8-dynamic":
        return _int8_dynamic(model)
    if method == "int8-static":
        if not calibration:
            raise CompressionError("int8-static needs calibration inputs")
        return _int8_static(model, calibration)
    if method == "int4-weight":
        return _int4(model, options)
    return lowrank(model, options)


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers import float16

    converted: onnx.ModelProto = float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)),
        disable_shape_infer=True,
    )
    # Intermediate type annotations are stale after the conversion: let ONNX infer them.
    del converted.graph.value_info[:]
    return toposort(converted)


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder the graph's nodes so every value is produced before it is used (the fp16
    converter appends its casts at the end)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in ready})[:5]
            raise CompressionError(f"graph has a cycle or undefined values: {', '.join(missing)}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def fold_transposed_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """`MatMul(x, Transpose(W))` with a constant W (a tied lm_head) -> `MatMul(x, W.T)` with
    W.T stored, so that weight quantisers, which need a constant B, see it."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    drop = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits or node.output[0] in outputs:
            continue
        consumers = users.get(node.output[0], [])
        if not consumers or any(
            c.op_type != "MatMul" or list(c.input).index(node.output[0]) != 1 for c in consumers
        ):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        value = numpy_helper.to_array(inits[node.input[0]])
        folded = np.ascontiguousarray(np.transpose(value, perm) if perm else value.T)
        graph.initializer.append(numpy_helper.from_array(folded, node.output[0]))
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    still_used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_used or t.name in outputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def _int8_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = fold_transposed_weights(onnx.ModelProto.FromString(model.SerializeToString()))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(
            model,
            out,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(str(out))


def _int8_static(
    model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
    """QDQ int8 with activation ranges from `calibration`. ONNX Runtime's calibrator makes
    sessions of its own, which a process using one global thread pool (lamc's multi-stage
    executor) cannot create: it runs in a fresh child process."""
    import concurrent.futures
    import multiprocessing

    model = fold_transposed_weights(onnx.ModelProto.FromString(model.SerializeToString()))
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
            pool.submit(_int8_static_files, str(src), str(out), str(data)).result()
        return onnx.load(str(out))


def _int8_static_files(src: str, out: str, data: str) -> None:
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

    # Weight MatMuls only: attention's activation x activation products (softmax
    # probabilities above all) lose too much in int8. Down-projections (weights wider in
    # than out: a transformer's FFN output, fed by heavy-tailed GELU activations) stay
    # fp32 too: one range per tensor cannot hold their outliers and their bulk.
    constants = {t.name: t for t in model.graph.initializer}
    weighted = [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm")
        and len(n.input) > 1
        and n.input[1] in constants
        and not (
            len(constants[n.input[1]].dims) == 2
            and constants[n.input[1]].dims[0] > constants[n.input[1]].dims[1]
        )
    ]
    quantize_static(
        model,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_quantize=weighted,
        extra_options={"MatMulConstBOnly": True},
    )


def _int4(model: onnx.ModelProto, options: Options) -> onnx.ModelProto:
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


def lowrank(model: onnx.ModelProto, options: Options) -> onnx.ModelProto:
    """Replace `MatMul(x, W)` with a constant 2-D W of at least `min_dim` on both sides by
    `MatMul(MatMul(x, A), B)`, A = U_r S_r, B = V_r^T, with the smallest rank r that keeps
    `energy` of sum(s^2), when that stores fewer numbers than W."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes = []
    drop: set[str] = set()
    for node in graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        tensor = inits.get(w_name)
        if tensor is None or consumers.get(w_name, 0) != 1 or len(tensor.dims) != 2:
            new_nodes.append(node)
            continue
        k, n = tensor.dims
        if min(k, n) < options.min_dim or tensor.data_type != onnx.TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(tensor).astype(np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        energy = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-30)
        rank = int(np.searchsorted(energy, options.energy) + 1)
        if rank * (k + n) >= k * n:
            new_nodes.append(node)
            continue
        a = (u[:, :rank] * s[:rank]).astype(np.float32)
        b = vt[:rank].astype(np.float32)
        a_name, b_name, mid = (
            f"{w_name}.lowrank_a",
            f"{w_name}.lowrank_b",
            f"{node.output[0]}.lowrank",
        )
        graph.initializer.extend(
            [numpy_helper.from_array(a, a_name), numpy_helper.from_array(b, b_name)]
        )
        drop.add(w_name)
        new_nodes.append(
            onnx.helper.make_node(
                "MatMul", [node.input[0], a_name], [mid], name=f"{node.name}.lowrank_a"
            )
        )
        new_nodes.append(
            onnx.helper.make_node(
                "MatMul", [mid, b_name], list(node.output), name=node.name or f"{w_name}.lowrank_b"
            )
        )
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model

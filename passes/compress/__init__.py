"""Compression of one stage's model: fp16, int8 (dynamic), int4 weight-only, low-rank.

Each method maps an ONNX model to a smaller one computing (nearly) the same function; the
stage's inputs and outputs keep their dtypes, so the stage boundaries stay as the
manifest says. ONNX Runtime's quantisation tools and onnxconverter-common do the work
where they can; the low-rank factorisation is lamc's own.

| method        | weights                     | compute                                  |
|---------------|-----------------------------|------------------------------------------|
| fp32          | as captured                 | as captured                              |
| fp16          | float16                     | float16, but LayerNorm/Softmax/reductions and the stage's inputs and outputs in float32 |
| int8-dynamic  | MatMul/Gemm weights int8 per tensor | activations quantised per call (DynamicQuantizeMatMul / MatMulInteger) |
| int4-weight   | MatMul weights 4-bit, blocks of 32 (or 128), fp32 scales | MatMulNBits (dequantised in the kernel) |
| lowrank       | large MatMul weights W ~ A @ B (SVD, rank by retained energy) | two MatMuls |
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

METHODS = ("fp32", "fp16", "int8-dynamic", "int4-weight", "lowrank")
# Bytes per fp32 weight byte after each method, for planning (int4: 4 bits + one fp32 scale
# per block of 32; lowrank: a typical retained fraction).
WEIGHT_RATIO = {
    "fp32": 1.0,
    "fp16": 0.5,
    "int8-dynamic": 0.25,
    "int4-weight": (4 + 32 / 32) / 32,
    "lowrank": 0.6,
}
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


class CompressionError(ValueError):
    pass


@dataclass(frozen=True)
class Options:
    block_size: int = 32  # int4-weight: 32 or 128
    energy: float = 0.99  # lowrank: fraction of the squared singular values kept
    min_dim: int = 256  # lowrank / int4: leave smaller weights as they are


def compress(
    model: onnx.ModelProto, method: str, options: Options | None = None
) -> onnx.ModelProto:
    """`model` (weights inline) compressed with `method`; the input is not modified."""
    options = options or Options()
    if method not in METHODS:
        raise CompressionError(f"unknown compression {method!r}; methods: {', '.join(METHODS)}")
    if method == "fp32":
        return model
    if method == "fp16":
        return _fp16(model)
    if method == "int8-dynamic":
        return _int8_dynamic(model)
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


def _int8_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(
            model,
            out,
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(str(out))


def _int4(model: onnx.ModelProto, options: Options) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if options.block_size not in (32, 64, 128):
        raise CompressionError(f"int4-weight block size {options.block_size}: use 32 or 128")
    quantizer = MatMulNBitsQuantizer(
        onnx.ModelProto.FromString(model.SerializeToString()),
        bits=4,
        block_size=options.block_size,
        is_symmetric=True,
        accuracy_level=4,
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


def parse_spec(spec: str, devices: list[tuple[str, str]]) -> dict[str, str]:
    """`--compress SPEC` -> device name -> method.

    `int8-dynamic` (every device), or `gpu=fp16,cpu=int8-dynamic` (by device kind), or
    `jetson=fp16,cpu=int8-dynamic` (a device name wins over its kind). `devices` lists
    (name, kind); devices no entry names stay fp32."""
    spec = spec.strip()
    if not spec:
        raise CompressionError("--compress is empty")
    if "=" not in spec:
        if spec not in METHODS:
            raise CompressionError(
                f"--compress {spec}: unknown method; methods: {', '.join(METHODS)}"
            )
        return {name: spec for name, _ in devices}
    by_key: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, method = (p.strip() for p in item.partition("="))
        if not sep or not key or method not in METHODS:
            raise CompressionError(
                f"--compress {item!r}: expected DEVICE_OR_KIND=METHOD with a method of {', '.join(METHODS)}"
            )
        by_key[key] = method
    names = {name for name, _ in devices}
    kinds = {kind for _, kind in devices}
    unknown = sorted(set(by_key) - names - kinds)
    if unknown:
        raise CompressionError(
            f"--compress: {', '.join(unknown)} is neither a device nor a device kind of the topology "
            f"(devices: {', '.join(sorted(names))}; kinds: {', '.join(sorted(kinds))})"
        )
    return {name: by_key.get(name, by_key.get(kind, "fp32")) for name, kind in devices}

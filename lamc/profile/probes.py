"""The probes: small ONNX models of one op (or a chain of ops) at sizes typical of real
models, with the work lamc's own analysis pass assigns them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from lamc.ir import COST, annotation
from lamc.passes.analyze import Analyze

FLOAT = TensorProto.FLOAT


@dataclass
class Probe:
    name: str
    op_class: str
    dtype: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    ops: int = 1
    flops: float = 0.0
    moved_bytes: float = 0.0
    weight_bytes: float = 0.0
    seconds: float = 0.0


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, list[int]]],
    outputs: Sequence[tuple[Any, ...]],
    initializers: list[onnx.TensorProto] | None = None,
    ms: bool = False,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(o[0], o[1], o[2] if len(o) > 2 else None) for o in outputs],
        initializer=initializers or [],
    )
    opsets = [helper.make_opsetid("", 18)] + (
        [helper.make_opsetid("com.microsoft", 1)] if ms else []
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def matmul(m: int, k: int, n: int, batch: tuple[int, ...] = ()) -> Probe:
    rng = _rng()
    w = (
        numpy_helper.from_array(rng.standard_normal((*batch, k, n)).astype(np.float32) * 0.01, "w")
        if not batch
        else None
    )
    if batch:
        feeds = {
            "a": rng.standard_normal((*batch, m, k)).astype(np.float32),
            "b": rng.standard_normal((*batch, k, n)).astype(np.float32),
        }
        model = _model(
            [helper.make_node("MatMul", ["a", "b"], ["y"])],
            [("a", FLOAT, [*batch, m, k]), ("b", FLOAT, [*batch, k, n])],
            [("y", FLOAT)],
        )
    else:
        feeds = {"a": rng.standard_normal((m, k)).astype(np.float32)}
        model = _model(
            [helper.make_node("MatMul", ["a", "w"], ["y"])],
            [("a", FLOAT, [m, k])],
            [("y", FLOAT)],
            [w] if w is not None else [],
        )
    return Probe(
        f"MatMul {'x'.join(map(str, batch)) + 'x' if batch else ''}{m}x{k}x{n}",
        "matmul",
        "fp32",
        model,
        feeds,
    )


def _matmul_int8(m: int, k: int, n: int) -> Probe:
    rng = _rng()
    w = numpy_helper.from_array(rng.integers(-64, 64, (k, n)).astype(np.int8), "w")
    feeds = {"a": rng.integers(0, 255, (m, k)).astype(np.uint8)}
    model = _model(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        [("a", TensorProto.UINT8, [m, k])],
        [("y", TensorProto.INT32)],
        [w],
    )
    return Probe(f"MatMulInteger {m}x{k}x{n}", "matmul", "int8", model, feeds)


def _matmul_nbits(m: int, k: int, n: int, block: int = 32) -> Probe:
    rng = _rng()
    blocks = k // block
    packed = numpy_helper.from_array(
        rng.integers(0, 255, (n, blocks, block // 2)).astype(np.uint8), "b"
    )
    scales = numpy_helper.from_array((rng.random(n * blocks).astype(np.float32) + 0.5) * 0.01, "s")
    node = helper.make_node(
        "MatMulNBits",
        ["a", "b", "s"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
    )
    # A contrib op: ONNX shape inference does not know it, so the output shape is stated.
    model = _model(
        [node], [("a", FLOAT, [m, k])], [("y", FLOAT, [m, n])], [packed, scales], ms=True
    )
    return Probe(
        f"MatMulNBits(4) {m}x{k}x{n}",
        "matmul",
        "int4",
        model,
        {"a": rng.standard_normal((m, k)).astype(np.float32)},
    )


def conv(c_in: int, c_out: int, size: int, kernel: int, stride: int = 1) -> Probe:
    rng = _rng()
    w = numpy_helper.from_array(
        rng.standard_normal((c_out, c_in, kernel, kernel)).astype(np.float32) * 0.01, "w"
    )
    pad = kernel // 2
    node = helper.make_node(
        "Conv",
        ["x", "w"],
        ["y"],
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pad] * 4,
    )
    model = _model([node], [("x", FLOAT, [1, c_in, size, size])], [("y", FLOAT)], [w])
    return Probe(
        f"Conv {kernel}x{kernel} {c_in}->{c_out} @{size}",
        "conv",
        "fp32",
        model,
        {"x": rng.standard_normal((1, c_in, size, size)).astype(np.float32)},
    )


def unary(op: str, shape: list[int], op_class: str, **attrs: Any) -> Probe:
    rng = _rng()
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    model = _model([node], [("x", FLOAT, shape)], [("y", FLOAT)])
    return Probe(
        f"{op} {'x'.join(map(str, shape))}",
        op_class,
        "fp32",
        model,
        {"x": rng.standard_normal(shape).astype(np.float32)},
    )


def _binary(op: str, shape: list[int]) -> Probe:
    rng = _rng()
    model = _model(
        [helper.make_node(op, ["x", "z"], ["y"])],
        [("x", FLOAT, shape), ("z", FLOAT, shape)],
        [("y", FLOAT)],
    )
    feeds = {
        "x": rng.standard_normal(shape).astype(np.float32),
        "z": rng.standard_normal(shape).astype(np.float32) + 3,
    }
    return Probe(f"{op} {'x'.join(map(str, shape))}", "elementwise", "fp32", model, feeds)


def _layernorm(rows: int, width: int) -> Probe:
    rng = _rng()
    scale = numpy_helper.from_array(np.ones(width, np.float32), "g")
    bias = numpy_helper.from_array(np.zeros(width, np.float32), "b")
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)
    model = _model([node], [("x", FLOAT, [rows, width])], [("y", FLOAT)], [scale, bias])
    return Probe(
        f"LayerNormalization {rows}x{width}",
        "norm",
        "fp32",
        model,
        {"x": rng.standard_normal((rows, width)).astype(np.float32)},
    )


def _batchnorm(channels: int, size: int) -> Probe:
    rng = _rng()
    inits = [
        numpy_helper.from_array(v, n)
        for n, v in (
            ("s", np.ones(channels, np.float32)),
            ("b", np.zeros(channels, np.float32)),
            ("m", np.zeros(channels, np.float32)),
            ("v", np.ones(channels, np.float32)),
        )
    ]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])
    model = _model([node], [("x", FLOAT, [1, channels, size, size])], [("y", FLOAT)], inits)
    return Probe(
        f"BatchNormalization {channels}@{size}",
        "norm",
        "fp32",
        model,
        {"x": rng.standard_normal((1, channels, size, size)).astype(np.float32)},
    )


def _gather(vocab: int, width: int, tokens: int) -> Probe:
    rng = _rng()
    table = numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "t")
    model = _model(
        [helper.make_node("Gather", ["t", "i"], ["y"])],
        [("i", TensorProto.INT64, [1, tokens])],
        [("y", FLOAT)],
        [table],
    )
    return Probe(
        f"Gather {vocab}x{width}[{tokens}]",
        "data",
        "fp32",
        model,
        {"i": rng.integers(0, vocab, (1, tokens)).astype(np.int64)},
    )


def _concat(shape: list[int]) -> Probe:
    rng = _rng()
    model = _model(
        [helper.make_node("Concat", ["x", "z"], ["y"], axis=-1)],
        [("x", FLOAT, shape), ("z", FLOAT, shape)],
        [("y", FLOAT)],
    )
    return Probe(
        f"Concat {'x'.join(map(str, shape))}",
        "data",
        "fp32",
        model,
        {
            "x": rng.standard_normal(shape).astype(np.float32),
            "z": rng.standard_normal(shape).astype(np.float32),
        },
    )


def chain(length: int) -> Probe:
    inits = [
        numpy_helper.from_array(np.full(16, 1e-3 * (i + 1), np.float32), f"c{i}")
        for i in range(length)
    ]
    nodes = [
        helper.make_node(
            "Add", ["x" if i == 0 else f"t{i - 1}", f"c{i}"], [f"t{i}" if i < length - 1 else "y"]
        )
        for i in range(length)
    ]
    model = _model(nodes, [("x", FLOAT, [16])], [("y", FLOAT)], inits)
    return Probe(
        f"{length} tiny Adds", "overhead", "fp32", model, {"x": np.ones(16, np.float32)}, ops=length
    )


def probes() -> list[Probe]:
    """Sizes typical of transformer and CNN layers at batch 1."""
    return [
        matmul(128, 768, 768),
        matmul(128, 768, 2304),
        matmul(128, 768, 3072),
        matmul(128, 3072, 768),
        matmul(197, 768, 3072),
        matmul(128, 2048, 2048),
        matmul(512, 1024, 4096),
        matmul(1, 768, 3072),
        matmul(128, 64, 128, batch=(12,)),
        matmul(128, 128, 64, batch=(12,)),
        _matmul_int8(128, 768, 3072),
        _matmul_int8(512, 1024, 4096),
        _matmul_nbits(128, 768, 3072),
        _matmul_nbits(512, 1024, 4096),
        conv(64, 64, 56, 3),
        conv(256, 64, 56, 1),
        conv(64, 256, 56, 1),
        conv(128, 128, 28, 3),
        conv(512, 512, 7, 3),
        conv(3, 64, 224, 7, stride=2),
        _binary("Add", [1 << 24]),
        _binary("Add", [128, 3072]),
        _binary("Mul", [128, 768]),
        _binary("Add", [1, 256, 56, 56]),
        unary("Relu", [1, 256, 56, 56], "elementwise"),
        unary("Erf", [128, 3072], "elementwise"),
        unary("Tanh", [128, 3072], "elementwise"),
        _layernorm(128, 768),
        _layernorm(197, 768),
        unary("Softmax", [1, 12, 128, 128], "norm", axis=-1),
        _batchnorm(256, 56),
        unary("ReduceMean", [128, 768], "norm", keepdims=1),
        unary("GlobalAveragePool", [1, 2048, 7, 7], "norm"),
        unary(
            "MaxPool",
            [1, 64, 112, 112],
            "norm",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        unary("Transpose", [1, 128, 12, 64], "data", perm=[0, 2, 1, 3]),
        _concat([1, 12, 128, 64]),
        _gather(50257, 768, 128),
    ]


def analyse(probe: Probe) -> None:
    model = ir.from_proto(probe.model)
    Analyze({})(model)
    costs = [annotation(n, COST) for n in model.graph]
    probe.flops = float(sum(c.flops for c in costs))
    probe.moved_bytes = float(sum(c.moved_bytes for c in costs))
    probe.weight_bytes = float(sum(c.weight_read_bytes for c in costs))

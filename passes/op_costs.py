"""What each operator costs: its class (for per-op-class device efficiency), its FLOPs, and
the bytes it moves. Matrix FLOPs (MatMul, Gemm, Conv, attention) are counted exactly as
2 x multiply-accumulates; element-wise ops count one FLOP per output element, and norms
and softmax a few, as noted in the table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import onnx_ir as ir

from lamc.ir import numel

Shape = tuple[int, ...]
# (flops, matrix_flops)
FlopRule = Callable[[ir.Node, Sequence[Shape | None], Sequence[Shape | None]], tuple[float, float]]

MATRIX = "matmul"
CONV = "conv"
NORM = "norm"
ELEMENTWISE = "elementwise"
DATA = "data"
FREE = "free"

# Ops that only relabel a buffer (no bytes move) or only compute shapes.
_VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout"}
_FREE = {"Shape", "Size", "Constant", "ConstantOfShape", "Range", "EyeLike", *_VIEWS}
_DATA = {
    "Transpose",
    "Gather",
    "GatherElements",
    "GatherND",
    "Concat",
    "Slice",
    "Split",
    "Expand",
    "Tile",
    "Pad",
    "Cast",
    "ScatterND",
    "ScatterElements",
    "Resize",
    "Trilu",
    "DepthToSpace",
    "SpaceToDepth",
    "CastLike",
    "Compress",
    "NonZero",
    "OneHot",
}
# Ops that read only the elements they return from their first input.
GATHERS = {"Gather", "GatherElements", "GatherND", "Slice"}
# FLOPs per element of the output (or of the input for reductions), for non-matrix ops.
_NORM_COST = {
    "LayerNormalization": 8,
    "SimplifiedLayerNormalization": 6,
    "RMSNormalization": 6,
    "SkipLayerNormalization": 9,
    "SkipSimplifiedLayerNormalization": 7,
    "BatchNormalization": 2,
    "InstanceNormalization": 8,
    "GroupNormalization": 8,
    "Softmax": 5,
    "LogSoftmax": 6,
}
_REDUCE = {
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceLogSumExp",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "AveragePool",
    "MaxPool",
    "ArgMax",
    "ArgMin",
    "CumSum",
    "TopK",
    "LpNormalization",
}


FUSED = "fused"
# Activations that runtimes (ONNX Runtime's FusedConv, TensorRT) fold into the conv before them.
_CONV_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish"}


def is_fused_epilogue(node: ir.Node) -> bool:
    """An activation that is the only consumer of a convolution's output runs inside it."""
    if node.op_type not in _CONV_ACTIVATIONS or not node.inputs or node.inputs[0] is None:
        return False
    producer = node.inputs[0].producer()
    return (
        producer is not None
        and producer.op_type in ("Conv", "FusedConv")
        and len(node.inputs[0].uses()) == 1
    )


def op_class(node: ir.Node) -> str:
    op = node.op_type
    if op in _MATRIX_RULES:
        return MATRIX
    if op in _CONV_RULES:
        return CONV
    if op in _NORM_COST or op in _REDUCE:
        return NORM
    if op in _FREE:
        return FREE
    if op in _DATA:
        return DATA
    return ELEMENTWISE


def moves_bytes(node: ir.Node) -> bool:
    """False for views and shape computations, which touch no tensor data."""
    return node.op_type not in _FREE


def flops(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    """(total FLOPs, matrix FLOPs) of `node` at concrete shapes; None shapes are unknown."""
    op = node.op_type
    rule = _MATRIX_RULES.get(op) or _CONV_RULES.get(op)
    if rule is not None:
        return rule(node, ins, outs)
    out = outs[0] if outs else None
    if op in _FREE or op in _DATA or out is None:
        return 0.0, 0.0
    if op in _NORM_COST:
        return float(_NORM_COST[op] * numel(out)), 0.0
    if op in _REDUCE:
        first = ins[0] if ins else None
        return float(numel(first) if first is not None else numel(out)), 0.0
    return float(numel(out)), 0.0


def _matmul(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    a, out = ins[0], outs[0]
    if a is None or out is None:
        raise ValueError("MatMul needs its input and output shapes")
    k = a[-1] if len(a) >= 1 else 1
    f = 2.0 * numel(out) * k
    return f, f


def _matmul_nbits(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    out = outs[0]
    if out is None:
        raise ValueError("MatMulNBits needs its output shape")
    k = node.attributes.get_int("K", 0)
    f = 2.0 * numel(out) * k
    bias = 1.0 * numel(out) if len(node.inputs) > 5 and node.inputs[5] is not None else 0.0
    return f + bias, f


def _gemm(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    a, out = ins[0], outs[0]
    if a is None or out is None:
        raise ValueError("Gemm needs its input and output shapes")
    k = a[0] if node.attributes.get_int("transA", 0) else a[1]
    f = 2.0 * numel(out) * k
    bias = float(numel(out)) if len(ins) > 2 and ins[2] is not None else 0.0
    return f + bias, f


def _conv(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    w, out = ins[1], outs[0]
    if w is None or out is None:
        raise ValueError("Conv needs its weight and output shapes")
    # Each output element is a dot product over (C_in / groups) x kernel.
    f = 2.0 * numel(out) * numel(w[1:])
    bias = float(numel(out)) if len(ins) > 2 and ins[2] is not None else 0.0
    return f + bias, f


def _conv_transpose(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    x, w = ins[0], ins[1]
    if x is None or w is None:
        raise ValueError("ConvTranspose needs its input and weight shapes")
    f = 2.0 * numel(x) * numel(w[1:])
    return f, f


def _einsum(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    equation = node.attributes.get_string("equation", "").replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs.split(","), ins):
        if shape is None or "." in term:
            raise ValueError("Einsum with ellipsis or unknown shapes")
        for letter, size in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
    contracted = set(sizes) - set(rhs)
    total = float(numel(sizes.values()))
    if contracted and len(ins) > 1:
        return 2.0 * total, 2.0 * total
    return total, 0.0


def _attention(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    """ONNX Attention (opset 23): QK^T and AV, both 2 x B x H x Sq x Skv x D."""
    q, k, v = ins[0], ins[1], ins[2]
    if q is None or k is None or v is None:
        raise ValueError("Attention needs q, k, v shapes")
    if len(q) == 4:
        b, h, sq, d = q
        skv, dv = k[2], v[3]
    else:
        h = node.attributes.get_int("q_num_heads", 1)
        b, sq = q[0], q[1]
        d = q[2] // h
        skv = k[1]
        dv = v[2] // max(node.attributes.get_int("kv_num_heads", 1), 1)
    f = 2.0 * b * h * sq * skv * (d + dv)
    return f + 5.0 * b * h * sq * skv, f


_MATRIX_RULES: dict[str, FlopRule] = {
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": _matmul,
    "DynamicQuantizeMatMul": _matmul,
    "MatMulIntegerToFloat": _matmul,
    "FusedMatMul": _matmul,
    "MatMulNBits": _matmul_nbits,
    "Gemm": _gemm,
    "Einsum": _einsum,
    "Attention": _attention,
}
_CONV_RULES: dict[str, FlopRule] = {
    "Conv": _conv,
    "QLinearConv": _conv,
    "ConvInteger": _conv,
    "ConvTranspose": _conv_transpose,
}


def is_index_name(text: str) -> bool:
    """`layer.3`, `h.11`: the last path element is a ModuleList index."""
    return re.fullmatch(r".*\.\d+", text) is not None

"""What each operator costs: its class (for per-op-class device efficiency), its FLOPs, and
the bytes it moves. Matrix FLOPs (MatMul, Gemm, Conv, attention) are counted exactly as
2 x multiply-accumulates; element-wise ops count one FLOP per output element, and norms
and softmax a few, as noted in the table.

ONNX Runtime's contrib operators (domain com.microsoft), which its transformer optimiser
and Optimum/Olive write (Attention, MultiHeadAttention, GroupQueryAttention,
EmbedLayerNormalization, SkipLayerNormalization, FastGelu, BiasGelu, ...), are costed as
the standard ops they fuse would be, so a fused model plans like its unfused export.
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
# Ops that read only the elements they return from some inputs (by position): gathers and
# slices from their first, EmbedLayerNormalization from its three embedding tables.
GATHERS = {"Gather", "GatherElements", "GatherND", "Slice"}
CONTRIB = "com.microsoft"


def gathered_inputs(node: ir.Node) -> frozenset[int]:
    """The inputs of `node` it reads only the rows of that it returns."""
    if node.op_type in GATHERS:
        return frozenset({0})
    if node.op_type == "EmbedLayerNormalization" and node.domain == CONTRIB:
        return frozenset({2, 3, 4})
    return frozenset()


# FLOPs per output element of fused element-wise contrib ops: what the ops they replace
# count (erf GELU: Div, Erf, Add, Mul, Mul; tanh GELU: eight; a bias adds one).
_ELEMENTWISE_COST = {
    "Gelu": 5,
    "BiasGelu": 6,
    "FastGelu": 8,
    "QuickGelu": 3,
    "BiasAdd": 2,
    "BiasSplitGelu": 6,
    "RotaryEmbedding": 3,
}
# FLOPs per element of the output (or of the input for reductions), for non-matrix ops.
_NORM_COST = {
    "LayerNormalization": 8,
    "SimplifiedLayerNormalization": 6,
    "RMSNormalization": 6,
    "SkipLayerNormalization": 9,
    "SkipSimplifiedLayerNormalization": 7,
    # Three gathered embeddings added, then a layer norm.
    "EmbedLayerNormalization": 10,
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


def _matrix_rule(node: ir.Node) -> FlopRule | None:
    if node.domain == CONTRIB and node.op_type in _CONTRIB_MATRIX_RULES:
        return _CONTRIB_MATRIX_RULES[node.op_type]
    return _MATRIX_RULES.get(node.op_type)


def op_class(node: ir.Node) -> str:
    op = node.op_type
    if _matrix_rule(node) is not None:
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
    rule = _matrix_rule(node) or _CONV_RULES.get(op)
    if rule is not None:
        return rule(node, ins, outs)
    out = outs[0] if outs else None
    if op in _FREE or op in _DATA or out is None:
        return 0.0, 0.0
    if op in _NORM_COST:
        return float(_NORM_COST[op] * numel(out)), 0.0
    if op in _ELEMENTWISE_COST:
        per = _ELEMENTWISE_COST[op]
        if op == "Gelu" and node.attributes.get_string("approximate", "none") == "tanh":
            per = _ELEMENTWISE_COST["FastGelu"]
        if op == "FastGelu" and len(ins) > 1 and ins[1] is not None:
            per += 1  # its bias
        return float(per * numel(out)), 0.0
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


def _head_attention(
    b: int, heads: int, sq: int, skv: int, d: float, dv: float
) -> tuple[float, float]:
    """QK^T and AV for every head (2 x B x H x Sq x Skv x (D + Dv)), plus the softmax."""
    f = 2.0 * b * heads * sq * skv * (d + dv)
    return f + 5.0 * b * heads * sq * skv, f


def _contrib_attention(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    """com.microsoft Attention: the packed Q/K/V projection of input (B, S, hidden) by
    weights (hidden, Dq + Dk + Dv) plus its bias, then attention per head over the past
    (input 4, (2, B, H, P, d)) and the new tokens."""
    x, w = ins[0], ins[1]
    if x is None or w is None or len(x) != 3 or len(w) != 2:
        raise ValueError("Attention (com.microsoft) needs its input and weight shapes")
    b, s, hidden = x
    heads = max(node.attributes.get_int("num_heads", 1), 1)
    sizes = list(node.attributes.get_ints("qkv_hidden_sizes", ()) or [])
    dq, _, dv = sizes if len(sizes) == 3 else [w[1] // 3] * 3
    past = ins[4] if len(ins) > 4 else None
    skv = s + (past[3] if past is not None and len(past) == 5 else 0)
    projection = 2.0 * b * s * hidden * w[1]
    bias = float(b * s * w[1]) if len(ins) > 2 and ins[2] is not None else 0.0
    f, matrix = _head_attention(b, heads, s, skv, dq / heads, dv / heads)
    return projection + bias + f, projection + matrix


def _multi_head_attention(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    """com.microsoft MultiHeadAttention: query (B, S, D) (or packed (B, S, N, 3, H)),
    key/value (B, L, D) or (B, N, L, H), a past key (B, N, P, H) prepended."""
    q = ins[0]
    if q is None:
        raise ValueError("MultiHeadAttention needs the query's shape")
    heads = max(node.attributes.get_int("num_heads", 1), 1)
    k = ins[1] if len(ins) > 1 else None
    v = ins[2] if len(ins) > 2 else None
    b, sq = q[0], q[1]
    if len(q) == 5:  # packed Q, K, V
        d = dv = float(q[4])
        skv = sq
    else:
        d = q[2] / heads
        if k is None:
            skv = sq
        elif len(k) == 5:  # packed K and V: (B, L, N, 2, H)
            skv = k[1]
        else:
            skv = k[1] if len(k) == 3 else k[2]
        dv = d if v is None else (v[2] / heads if len(v) == 3 else float(v[3]))
    past = ins[6] if len(ins) > 6 else None
    if past is not None and len(past) == 4:
        skv += past[2]
    return _head_attention(b, heads, sq, skv, d, dv)


def _group_query_attention(
    node: ir.Node, ins: Sequence[Shape | None], outs: Sequence[Shape | None]
) -> tuple[float, float]:
    """com.microsoft GroupQueryAttention: query (B, S, N x H) (or Q, K and V packed along
    the last axis), attending over the present key's length (output 1, (B, Nkv, L, H))."""
    q = ins[0]
    if q is None:
        raise ValueError("GroupQueryAttention needs the query's shape")
    heads = max(node.attributes.get_int("num_heads", 1), 1)
    kv_heads = max(node.attributes.get_int("kv_num_heads", heads), 1)
    packed = len(ins) < 2 or ins[1] is None
    d = q[2] / (heads + 2 * kv_heads) if packed else q[2] / heads
    present = outs[1] if len(outs) > 1 else None
    skv = present[2] if present is not None and len(present) == 4 else q[1]
    return _head_attention(q[0], heads, q[1], skv, d, d)


_CONTRIB_MATRIX_RULES: dict[str, FlopRule] = {
    "Attention": _contrib_attention,
    "MultiHeadAttention": _multi_head_attention,
    "GroupQueryAttention": _group_query_attention,
}

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

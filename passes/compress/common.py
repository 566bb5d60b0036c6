"""What every compression method shares: options, errors, and graph edits on ONNX protos."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


class CompressionError(ValueError):
    """A compression method cannot be applied (a user-facing reason)."""


@dataclass(frozen=True)
class Options:
    block_size: int = 32  # int4-weight: 32 or 128
    energy: float = 0.99  # lowrank: fraction of the squared singular values kept
    min_dim: int = 256  # lowrank / int4: leave smaller weights as they are
    # int8: max|x| / rms(x) of a MatMul's input above which it stays fp32. Static ranges
    # are fixed at calibration, so inputs unlike the samples clip as well: a lower bar.
    outlier_ratio: float = 48.0
    static_outlier_ratio: float = 20.0


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


def weighted_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul/Gemm nodes whose B is a constant (what weight quantisation touches)."""
    constants = {t.name for t in model.graph.initializer}
    return [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in constants
    ]


def named_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every node named (quantisers select nodes by name)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    taken = {n.name for n in model.graph.node if n.name}
    for k, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model

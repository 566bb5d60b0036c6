"""lowrank: large MatMul weights W ~ A @ B (SVD, rank by retained energy): two MatMuls."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from lamc.passes.compress.common import Options


def lowrank(
    model: onnx.ModelProto, options: Options, samples: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
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

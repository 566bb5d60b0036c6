"""Small IR models built by hand, and a structural summary of a graph: what the
Before/Expected tests of tagging, slicing and compression compare."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from lamc.ir import UNIT, annotate
from lamc.plan import Plan, StagePlan


def mlp_with_skip(width: int = 64, units: int = 4) -> ir.Model:
    """x -> (MatMul, Relu) per unit, unit k's node tagged with unit k; the first unit's
    output also feeds the last unit (a skip connection across every cut)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for k in range(units):
        inits.append(
            numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{k}")
        )
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"], name=f"mm{k}"))
        nodes.append(helper.make_node("Relu", [f"m{k}"], [f"h{k}"], name=f"relu{k}"))
        x = f"h{k}"
    nodes.append(helper.make_node("Add", [x, "h0"], ["y"], name="skip"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width])],
        initializer=inits,
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    for node in model.graph:
        unit = int(node.name[-1]) if node.name[-1].isdigit() else units - 1
        annotate(node, UNIT, unit)
    return model


def plan_of(stages: list[tuple[str, int, int]], name: str = "mlp") -> Plan:
    """A plan with the given (device, start unit, end unit) stages and no costs."""
    return Plan(
        model=name,
        topology="test",
        objective="throughput",
        binding={},
        stages=tuple(
            StagePlan(
                index=k,
                device=device,
                host=device,
                kind="cpu",
                backend="onnxruntime",
                start_unit=start,
                end_unit=end,
                units=tuple(f"u{u}" for u in range(start, end)),
                params_bytes=0.0,
                activation_bytes=0.0,
                kv_bytes=0.0,
                runtime_bytes=0.0,
                memory_bytes=0.0,
                capacity_bytes=1.0,
                compute_ms=0.0,
                transfer_ms=0.0,
                transfer_bytes=0.0,
                route=(),
            )
            for k, (device, start, end) in enumerate(stages)
        ),
        bottleneck_ms=0.0,
        latency_ms=0.0,
        inbound_ms=0.0,
        fluid_bound_ms=0.0,
    )


def summary(nodes: Any, inputs: Any, outputs: Any, initializers: Any) -> dict[str, Any]:
    """Op types and names in order, the boundary names, the weights by name and dtype."""
    return {
        "nodes": [(n.op_type, n.name) for n in nodes],
        "inputs": [v.name for v in inputs],
        "outputs": [v.name for v in outputs],
        "weights": sorted((v.name, v.const_value.dtype.name) for v in initializers),
    }

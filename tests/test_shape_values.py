"""Shape tensors followed symbolically: the values a stage receiving one across a cut is
warmed up with, as dim expressions; anything computed from data is left out."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from lamc.dims import eval_dim
from lamc.ir import shape_values


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def test_reshape_target_from_shape_gather_mul_concat() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),  # scalar batch
        helper.make_node("Slice", ["s", "one", "two"], ["q"]),  # [seq]
        helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
        helper.make_node("Mul", ["b1", "q"], ["bq"]),  # [batch*seq]
        helper.make_node("Concat", ["bq", "four", "two"], ["target"], axis=0),
        helper.make_node("Div", ["target", "two"], ["half"]),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        # Data-dependent: an argmax's value is not a function of the dims.
        helper.make_node("ArgMax", ["x"], ["am"], axis=2, keepdims=0),
        helper.make_node("Cast", ["am"], ["amc"], to=TensorProto.INT64),
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        _i64("zero1", [0]),
        _i64("one", [1]),
        _i64("two", [2]),
        _i64("four", [4]),
    ]
    values = shape_values(_model(nodes, inits), ["target", "half", "amc", "y", "missing"])
    assert set(values) == {"target", "half"}
    target = values["target"]
    for batch, seq in [(1, 1), (3, 7), (2, 128)]:
        binding = {"batch": batch, "seq": seq}
        assert [eval_dim(v, binding) for v in target] == [batch * seq, 4, 2]
        assert [eval_dim(v, binding) for v in values["half"]] == [batch * seq // 2, 2, 1]


def test_unknown_dims_and_cycles_give_no_value() -> None:
    # A Shape of a tensor with an unnamed dim cannot be written as an expression.
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = ir.from_proto(helper.make_model(graph))
    assert shape_values(model, ["s"]) == {}
    # A long chain of Identity nodes ends in a bounded walk, not a recursion error.
    nodes = [helper.make_node("Shape", ["x"], ["v0"])]
    nodes += [helper.make_node("Identity", [f"v{i}"], [f"v{i + 1}"]) for i in range(600)]
    nodes.append(helper.make_node("Reshape", ["x", "v600"], ["y"]))
    deep = _model(nodes, [])
    assert shape_values(deep, ["v150"]) == {"v150": ["batch", "seq", 8]}
    assert shape_values(deep, ["v600"]) == {}  # beyond the depth it follows


def test_large_integer_tensors_are_not_recorded() -> None:
    big = helper.make_tensor("big", TensorProto.INT64, [100], list(range(100)))
    nodes = [
        helper.make_node("Identity", ["big"], ["b"]),
        helper.make_node("Identity", ["x"], ["y"]),
    ]
    assert shape_values(_model(nodes, [big]), ["b"]) == {}

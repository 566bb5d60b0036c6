"""The fp16 stage pass, Before/Expected: weights become float16, the stage keeps float32
at its boundary and in its normalisations, and it computes what the fp32 stage does
within fp16's precision."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lamc.backends.onnxruntime.run import new_session
from lamc.errors import EngineBuildError
from lamc.passes.base import PassManager
from lamc.passes.compress import METHODS, CompressStage


def _before() -> ir.Model:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) / 8, "w")
    scale = numpy_helper.from_array(np.ones(32, np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("LayerNormalization", ["m", "scale"], ["y"], name="ln"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        initializer=[w, scale],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_fp16_before_expected() -> None:
    before = _before()
    reference = new_session(ir.to_proto(before).SerializeToString())
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    (want,) = reference.run(["y"], {"x": x})

    after = PassManager([CompressStage("fp16")]).run(before).model
    assert after is not before  # a rewrite: the fp32 stage stays as it was
    graph = after.graph
    weights = {v.name: v.const_value.dtype for v in graph.initializers.values()}
    assert weights["w"] == ir.DataType.FLOAT16
    # The boundary keeps its dtypes (the manifest's tensor specs still hold) ...
    assert [v.dtype for v in graph.inputs] == [ir.DataType.FLOAT]
    assert [v.dtype for v in graph.outputs] == [ir.DataType.FLOAT]
    # ... the MatMul runs in float16, the normalisation in float32.
    by_name = {n.name: n for n in graph}
    ln = by_name["ln"]
    producer = ln.inputs[0].producer()
    assert producer is not None and producer.op_type == "Cast"
    assert producer.attributes["to"].value == ir.DataType.FLOAT
    ops = [n.op_type for n in graph]
    assert ops.count("MatMul") == 1 and "Cast" in ops

    (got,) = new_session(ir.to_proto(after).SerializeToString()).run(["y"], {"x": x})
    assert np.allclose(got, want, atol=2e-2, rtol=1e-2)  # fp16 weights: ~3 decimal digits


def test_every_method_is_in_the_registry_once() -> None:
    assert next(iter(METHODS)) == "fp32"
    assert len(set(METHODS)) == len(METHODS) == 6
    for name, method in METHODS.items():
        assert method.name == name == method.cost.name
        assert 0 < method.cost.weight_ratio <= 1


def test_a_method_that_cannot_apply_is_an_engine_build_error() -> None:
    with pytest.raises(EngineBuildError, match="int8-static needs calibration inputs"):
        PassManager([CompressStage("int8-static")]).run(_before())

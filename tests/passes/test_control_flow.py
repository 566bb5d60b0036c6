"""ONNX control flow (If, Loop): costed with what it runs, kept whole inside a unit, and
sliced into stages whose branches still find the outer values they read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lamc.backends.onnxruntime.run import new_session
from lamc.compiler import CompileOptions, analyse, compile_model
from lamc.frontend import CaptureOptions
from lamc.passes.partition.planner import PlanRequest
from lamc.runtime.executor import Pipeline
from lamc.topology import Constraints
from tests.compiled import MINIPCS

W = (np.arange(12, dtype=np.float32).reshape(3, 4) - 6) / 10
V = np.eye(4, dtype=np.float32) * 0.5 + 0.1


def _value(name: str, shape: list[object]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(path: Path) -> None:
    """x -> Relu -> If(sum > 0: h @ w, else: -(h @ w)) -> Loop 3 times (v @ u) -> Sigmoid.
    The branches and the body read `h`, `w` and `u` from the outer graph."""
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["t"])], "then", [], [_value("t", ["b", 4])]
    )
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["e0"]), helper.make_node("Neg", ["e0"], ["e"])],
        "else",
        [],
        [_value("e", ["b", 4])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["v_in", "u"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _value("v_in", ["b", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            _value("v_out", ["b", 4]),
        ],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y0"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "yes", "y0"], ["y1"], body=body),
        helper.make_node("Sigmoid", ["y1"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(W, "w"),
        numpy_helper.from_array(V, "u"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(3, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "yes"),
    ]
    graph = helper.make_graph(
        nodes, "flow", [_value("x", ["b", 3])], [_value("y", ["b", 4])], initializer=initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flow") / "flow.onnx"
    _model(path)
    return path


def test_control_flow_is_costed_with_what_it_runs(model_path: Path) -> None:
    analysed = analyse(str(model_path), CaptureOptions(dims={"b": 2}))
    units = analysed.workload.units
    # The If's heavier branch: one (2x3)@(3x4) matmul; the Loop: three (2x4)@(4x4).
    assert sum(u.matrix_flops for u in units) == 2 * 2 * 3 * 4 + 3 * (2 * 2 * 4 * 4)
    # The weights only the subgraphs read belong to the units of their nodes.
    assert sum(u.param_bytes for u in units) >= W.nbytes + V.nbytes
    assert analysed.captured.model.meta["lamc.analysis"].unresolved == ()


@pytest.mark.parametrize("stages", [2, 3])
def test_control_flow_runs_sliced_into_stages(
    model_path: Path, tmp_path: Path, stages: int
) -> None:
    analysed = analyse(str(model_path), CaptureOptions(dims={"b": 2}))
    request = PlanRequest(constraints=Constraints(stages=stages))
    out = tmp_path / "out"
    compile_model(str(model_path), MINIPCS, out, CompileOptions(request=request), analysed=analysed)  # fmt: skip
    pipeline = Pipeline.open(out)
    assert len(pipeline.stages) == stages
    reference = new_session(str(model_path))
    rng = np.random.default_rng(1)
    for sign in (1.0, -1.0):  # both branches of the If
        x = (sign * np.abs(rng.standard_normal((5, 3))) + sign * 0.1).astype(np.float32)
        np.testing.assert_allclose(
            pipeline.run({"x": x})["y"], reference.run(None, {"x": x})[0], rtol=1e-6, atol=1e-6
        )


def test_a_scopeless_onnx_file_is_cut_at_its_block_boundaries(tmp_path: Path) -> None:
    """An ONNX file with no module scopes and anonymous node names (as other exporters
    write them): units come from where few tensors cross, so a 2-layer GPT-2 is not one
    lopsided unit, and a 3-stage pipeline of it matches ONNX Runtime on the file."""
    import onnx_ir as ir

    from tests.conftest import analysed_model

    path = tmp_path / "gpt2.onnx"
    ir.save(analysed_model("zoo:gpt2:test").captured.model, path)
    proto = onnx.load(str(path))
    for position, node in enumerate(proto.graph.node):
        del node.metadata_props[:]
        node.name = f"n{position}"
    onnx.save(proto, str(path))
    analysed = analyse(str(path), CaptureOptions(dims={"batch": 1, "seq": 16}))
    units = analysed.workload.units
    total = sum(u.flops for u in units)
    assert len(units) >= 6
    assert max(u.flops for u in units) < 0.3 * total
    request = PlanRequest(constraints=Constraints(stages=3))
    compile_model(str(path), MINIPCS, tmp_path / "out", CompileOptions(request=request), analysed=analysed)  # fmt: skip
    pipeline = Pipeline.open(tmp_path / "out")
    reference = new_session(str(path))
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 11)).astype(np.int64)
    want = dict(
        zip([o.name for o in reference.get_outputs()], reference.run(None, {"input_ids": ids}))
    )
    got = pipeline.run({"input_ids": ids})
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)

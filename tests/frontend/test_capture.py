"""Capture: every kind of MODEL becomes IR that ONNX Runtime runs like the source model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lamc.backends.onnxruntime.run import new_session
from lamc.errors import CaptureError, ExitCode, UsageError
from lamc.frontend import CaptureOptions, capture, random_inputs
from tests.conftest import ZOO_TEST, analysed_model

DATA = Path(__file__).parent.parent / "data"
USER = DATA / "user_models.py"


def _session(model: ir.Model, tmp_path: Path) -> ort.InferenceSession:
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    return new_session(str(path))


@pytest.mark.parametrize("ref", ZOO_TEST)
def test_zoo_ir_matches_torch(ref: str, tmp_path: Path) -> None:
    """The captured IR, run by ONNX Runtime at a shape other than the traced one, matches torch."""
    captured = analysed_model(ref).captured
    session = _session(captured.model, tmp_path)
    binding = {name: min(high, 3) for name, (low, high) in captured.dims.items()}
    feeds = random_inputs(captured, binding, np.random.default_rng(7))
    got = dict(zip(captured.output_names, session.run(None, feeds)))
    assert captured.reference is not None
    expected = captured.reference(feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-4, err_msg=name)


def test_dims_are_named_and_ranged() -> None:
    captured = analysed_model("zoo:gpt2:test").captured
    assert captured.dims == {"batch": (1, 64), "seq": (1, 256)}
    dims = captured.model.graph.inputs[0].shape.dims
    assert [d.value for d in dims] == ["batch", "seq"]  # type: ignore[union-attr]


def test_file_factory_and_dynamic_override() -> None:
    captured = capture(
        f"{USER}:spec_factory", CaptureOptions(dynamic={"batch": (1, 4)}, dims={"batch": 2})
    )
    assert captured.name == "two-layer"
    assert captured.dims == {"batch": (1, 4)}
    assert captured.operating_point == {"batch": 2}


def test_module_factory_returning_tuple() -> None:
    captured = capture("tests.data.user_models:tuple_factory")
    assert captured.input_names == ["x"]
    assert captured.dims == {"batch": (1, 32)}


def test_onnx_file_with_external_data(tmp_path: Path) -> None:
    captured = analysed_model("zoo:resnet:test").captured
    path = tmp_path / "resnet.onnx"
    ir.save(captured.model, path, external_data="resnet.onnx.data", size_threshold_bytes=1024)
    assert (tmp_path / "resnet.onnx.data").stat().st_size > 0
    loaded = capture(str(path), CaptureOptions(dims={"batch": 2}))
    assert loaded.operating_point == {"batch": 2}
    assert loaded.reference is not None
    feeds = {
        "pixel_values": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    }
    np.testing.assert_allclose(
        loaded.reference(feeds)["logits"], captured.reference(feeds)["logits"], atol=1e-5
    )  # type: ignore[misc]


# ---------------------------------------------------------------- bad inputs: code + one line


def _fails(ref: str, code: ExitCode, needle: str, options: CaptureOptions | None = None) -> str:
    with pytest.raises((CaptureError, UsageError)) as info:
        capture(ref, options)
    assert info.value.exit_code == code
    message = info.value.message
    assert "\n" not in message
    assert needle in message, message
    return message


def test_missing_file_is_usage() -> None:
    _fails("does/not/exist.onnx", ExitCode.USAGE, "does not exist")
    _fails("does/not/exist.py:factory", ExitCode.USAGE, "does not exist")


def test_factory_that_raises() -> None:
    message = _fails(f"{USER}:raising_factory", ExitCode.CAPTURE, "checkpoint shard 3 is missing")
    assert "user_models.py:" in message  # points at the user's line


def test_data_dependent_control_flow() -> None:
    message = _fails(f"{USER}:data_dependent_factory", ExitCode.CAPTURE, "data-dependent")
    assert "user_models.py:" in message and "if y.sum() > 0" in message


def test_factory_returning_garbage() -> None:
    _fails(f"{USER}:not_a_model", ExitCode.CAPTURE, "returned str")


def test_truncated_onnx(tmp_path: Path) -> None:
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
            initializer=[onnx.numpy_helper.from_array(np.ones(1000, np.float32), "w")],
        )
    )
    data = model.SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    _fails(str(path), ExitCode.CAPTURE, "is not a valid ONNX model")


def test_external_data_outside_model_dir(tmp_path: Path) -> None:
    captured = analysed_model("zoo:resnet:test").captured
    inner = tmp_path / "inner"
    inner.mkdir()
    ir.save(
        captured.model, inner / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=1024
    )
    proto = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../escape.data"
    onnx.save(proto, str(inner / "m.onnx"))
    _fails(str(inner / "m.onnx"), ExitCode.CAPTURE, "outside the model directory")


def test_unknown_dynamic_dim() -> None:
    _fails(
        f"{USER}:spec_factory",
        ExitCode.CAPTURE,
        "does not have",
        CaptureOptions(dynamic={"seq": (1, 4)}),
    )


def test_dims_out_of_range() -> None:
    _fails(
        f"{USER}:spec_factory",
        ExitCode.USAGE,
        "outside its range",
        CaptureOptions(dims={"batch": 99}),
    )


def test_weightless_capture_plans_without_memory() -> None:
    light = analysed_model("zoo:gpt2:test", weights=False)
    full = analysed_model("zoo:gpt2:test")
    assert not light.captured.has_weights and light.captured.reference is None
    assert [u.name for u in light.workload.units] == [u.name for u in full.workload.units]
    from lamc import models

    module = models.build("gpt2", "test").module
    torch_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    # A shapes-only capture holds every parameter as an initializer; what a runtime stores
    # also includes constants it folds at load time (the tied LM head's transposed copy).
    graph = light.captured.model.graph
    initializer_bytes = sum(
        v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None
    )
    assert initializer_bytes == torch_bytes
    assert light.workload.param_bytes >= torch_bytes
    # The optimised capture also merges bit-identical initializers (the all-ones LayerNorm
    # weights of a fresh model), so its initializers hold less than torch's count.
    full_graph = full.captured.model.graph
    assert (
        sum(
            v.const_value.nbytes
            for v in full_graph.initializers.values()
            if v.const_value is not None
        )
        < torch_bytes
    )
    light_matrix = sum(u.matrix_flops for u in light.workload.units)
    full_matrix = sum(u.matrix_flops for u in full.workload.units)
    assert light_matrix == full_matrix


def test_an_empty_onnx_file_is_a_capture_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert "empty (0 bytes)" in _fails(str(path), ExitCode.CAPTURE, "is not a valid ONNX model")


def _external(name: str, location: str) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[2])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@pytest.mark.parametrize("where", ["constant", "subgraph"])
def test_external_data_outside_the_model_is_refused_everywhere(tmp_path: Path, where: str) -> None:
    from onnx import helper

    outside = "../../etc/passwd"
    if where == "constant":
        nodes = [
            helper.make_node("Constant", [], ["c"], name="const", value=_external("c", outside)),
            helper.make_node("Add", ["x", "c"], ["y"], name="add"),
        ]
    else:
        branch = helper.make_graph(
            [helper.make_node("Identity", ["w"], ["b"], name="inner")],
            "branch",
            [],
            [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2])],
            initializer=[_external("w", outside)],
        )
        nodes = [
            helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
            helper.make_node(
                "If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch
            ),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        initializer=[onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    message = _fails(str(path), ExitCode.CAPTURE, "points outside the model directory")
    assert outside in message


def test_a_factory_calling_sys_exit_is_a_capture_error() -> None:
    message = _fails(f"{USER}:exiting_factory", ExitCode.CAPTURE, "called sys.exit(0)")
    assert "instead of returning a model" in message


def _anonymous_dims_model(path: Path) -> None:
    """A small conv net whose input has a literal "?" batch, an unnamed height and a -1
    width, and whose intermediate and output shapes say "?" again (as some exporters
    write them): three sizes that have nothing to do with each other."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "anonymous",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, None, -1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", 4])],
        initializer=weights,
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, ["?", 8, "?", "?"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_anonymous_dims_each_get_a_symbol_of_their_own(tmp_path: Path) -> None:
    """`?`, unnamed and -1 dims are three independent sizes: the compiled pipeline runs
    at shapes where they all differ, as ONNX Runtime runs the file itself."""
    from lamc.compiler import CompileOptions, analyse, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.runtime.executor import Pipeline
    from lamc.topology import Constraints
    from tests.compiled import MINIPCS

    path = tmp_path / "anonymous.onnx"
    _anonymous_dims_model(path)
    analysed = analyse(str(path), CaptureOptions(dims={"x_2": 8, "x_3": 8}))
    captured = analysed.captured
    assert list(captured.dims) == ["x_0", "x_2", "x_3"]
    assert [str(d) for d in captured.model.graph.inputs[0].shape.dims] == ["x_0", "3", "x_2", "x_3"]
    assert any("axis 3 has no dim name; lamc names it 'x_3'" in w for w in captured.warnings)
    request = PlanRequest(constraints=Constraints(stages=1))
    compile_model(str(path), MINIPCS, tmp_path / "out", CompileOptions(request=request), analysed=analysed)  # fmt: skip
    pipeline = Pipeline.open(tmp_path / "out")
    reference = new_session(str(path))
    rng = np.random.default_rng(0)
    for shape in [(2, 3, 5, 9), (1, 3, 7, 4), (3, 3, 8, 8)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got = pipeline.run({"x": x})["y"]
        np.testing.assert_allclose(got, reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)

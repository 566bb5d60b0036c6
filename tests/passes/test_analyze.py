"""Analysis: every node gets shapes, dtypes, FLOPs and bytes; FLOPs agree with PyTorch's counter."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lamc import models
from lamc.compiler import Analysed, analyse
from lamc.ir import COST, annotation
from lamc.passes.analyze import Analyze
from lamc.passes.base import PassManager
from tests.conftest import ZOO_TEST, analysed_model


def _torch_matrix_flops(ref: str, analysed: Analysed, *, meta: bool = False) -> int:
    """FlopCounterMode on the same model and inputs. On the CPU, SDPA's flash kernel and
    MultiheadAttention's fast path carry no FLOP formula, so both are forced onto their
    decomposed math paths, which the counter sees as bmm."""
    _, name, *rest = ref.split(":", 2)
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with device:
        spec = models.build(name, rest[0] if rest else None)
    captured = analysed.captured
    binding = analysed.workload.binding
    from lamc.frontend import random_inputs

    feeds = random_inputs(captured, binding, np.random.default_rng(0))
    args = [torch.from_numpy(feeds[n]).to("meta" if meta else "cpu") for n in captured.input_names]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with (
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
            torch.no_grad(),
        ):
            spec.module(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("ref", ZOO_TEST)
def test_matrix_flops_match_flop_counter_test_configs(ref: str) -> None:
    result = analysed_model(ref)
    ours = sum(u.matrix_flops for u in result.workload.units)
    theirs = _torch_matrix_flops(ref, result)
    assert ours == pytest.approx(theirs, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ref", "weights"),
    [
        ("zoo:gpt2", True),
        ("zoo:llama:1b,layers=2", False),
    ],
)
def test_matrix_flops_match_flop_counter_default_configs(ref: str, weights: bool) -> None:
    """Realistic widths: gpt2-small whole, llama-1b's layer shapes (2 of its 16 layers,
    captured shapes-only: 4.4 GB of fp32 weights otherwise). (The vision and encoder zoo
    models are checked at their test configs above; their default configs cost a minute
    of the suite and exercise the same counting.)"""
    result = analysed_model(ref, weights=weights)
    ours = sum(u.matrix_flops for u in result.workload.units)
    theirs = _torch_matrix_flops(ref, result, meta=not weights)
    assert ours == pytest.approx(theirs, rel=0.02)


def test_every_node_is_annotated() -> None:
    result = analysed_model("zoo:llama:test")
    for node in result.captured.model.graph:
        cost = annotation(node, COST)
        assert cost is not None and cost.resolved, node.name
        for value in node.outputs:
            assert value.dtype is not None and value.shape is not None, value.name
    summary = result.captured.model.meta["lamc.analysis"]
    assert summary.unresolved == ()
    # Shapes stay symbolic on the IR.
    logits = result.captured.model.graph.outputs[0]
    assert [d if isinstance(d, int) else d.value for d in logits.shape.dims] == [
        "batch",
        "seq",
        512,
    ]


def test_scopes_come_from_the_exporter() -> None:
    result = analysed_model("zoo:gpt2:test")
    scopes = {tuple(annotation(n, "lamc.scope")) for n in result.captured.model.graph}
    assert ("transformer.h.2", "transformer.h.2.attn", "transformer.h.2.attn.c_attn") in scopes


# ----------------------------------------------------- Before / Expected on hand-built graphs


def _single_op(
    op: str,
    inputs: list[tuple[str, list[int | str]]],
    output: list[int | str],
    weights: dict[str, np.ndarray],
    **attrs: object,
) -> ir.Model:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, [n for n, _ in inputs] + list(weights), ["y"], **attrs)],
        "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, output)],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return ir.from_proto(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    )


@pytest.mark.parametrize(
    ("model", "binding", "flops", "matrix"),
    [
        # [b, s, 64] x [64, 32]: 2*b*s*32*64
        (
            _single_op(
                "MatMul",
                [("x", ["b", "s", 64])],
                ["b", "s", 32],
                {"w": np.zeros((64, 32), np.float32)},
            ),
            {"b": 2, "s": 5},
            2 * 2 * 5 * 32 * 64,
            2 * 2 * 5 * 32 * 64,
        ),
        # Gemm with bias: matrix part 2*M*N*K, plus one add per output
        (
            _single_op(
                "Gemm",
                [("x", [4, 16])],
                [4, 8],
                {"w": np.zeros((8, 16), np.float32), "c": np.zeros(8, np.float32)},
                transB=1,
            ),
            {},
            2 * 4 * 8 * 16 + 4 * 8,
            2 * 4 * 8 * 16,
        ),
        # Conv 3x3, 3->8 channels, 10x10 output: 2 * out elements * Cin * 9
        (
            _single_op(
                "Conv",
                [("x", [1, 3, 10, 10])],
                [1, 8, 10, 10],
                {"w": np.zeros((8, 3, 3, 3), np.float32)},
                pads=[1, 1, 1, 1],
            ),
            {},
            2 * 800 * 27,
            2 * 800 * 27,
        ),
        # Grouped conv: each output sees Cin/groups channels
        (
            _single_op(
                "Conv",
                [("x", [1, 8, 6, 6])],
                [1, 8, 6, 6],
                {"w": np.zeros((8, 2, 3, 3), np.float32)},
                pads=[1, 1, 1, 1],
                group=4,
            ),
            {},
            2 * 288 * 18,
            2 * 288 * 18,
        ),
        # Element-wise: one FLOP per output element
        (_single_op("Relu", [("x", ["n", 7])], ["n", 7], {}), {"n": 3}, 21, 0),
        # Softmax: five per element
        (_single_op("Softmax", [("x", [2, 10])], [2, 10], {}), {}, 100, 0),
        # A view moves nothing and costs nothing
        (
            _single_op("Reshape", [("x", [2, 6])], [3, 4], {"shape": np.array([3, 4], np.int64)}),
            {},
            0,
            0,
        ),
    ],
)
def test_flop_rules(model: ir.Model, binding: dict[str, int], flops: int, matrix: int) -> None:
    Analyze(binding)(model)
    cost = annotation(next(iter(model.graph)), COST)
    assert (cost.flops, cost.matrix_flops) == (flops, matrix)
    assert cost.resolved


def test_param_and_activation_bytes() -> None:
    model = _single_op(
        "MatMul", [("x", ["b", 64])], ["b", 32], {"w": np.zeros((64, 32), np.float32)}
    )
    Analyze({"b": 10})(model)
    cost = annotation(next(iter(model.graph)), COST)
    assert cost.param_bytes == 64 * 32 * 4
    assert cost.output_bytes == 10 * 32 * 4
    assert cost.moved_bytes == (10 * 64 + 64 * 32 + 10 * 32) * 4


def test_unknown_binding_is_reported_not_guessed() -> None:
    model = _single_op("Relu", [("x", ["n", 7])], ["n", 7], {})
    Analyze({})(model)
    cost = annotation(next(iter(model.graph)), COST)
    assert not cost.resolved
    assert (
        model.meta["lamc.analysis"].unresolved == ("",)
        or len(model.meta["lamc.analysis"].unresolved) == 1
    )


def test_dump_ir_writes_each_pass(tmp_path: Path) -> None:
    result = analyse("tests.data.user_models:spec_factory", dump_ir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00-input.lamc.json",
        "00-input.onnxtxt",
        "01-Analyze.lamc.json",
        "01-Analyze.onnxtxt",
        "02-BuildUnits.lamc.json",
        "02-BuildUnits.onnxtxt",
    ]
    notes = json.loads((tmp_path / "02-BuildUnits.lamc.json").read_text())
    assert all("lamc.cost" in v and "lamc.unit" in v for v in notes.values())
    assert (
        "MatMul" in (tmp_path / "01-Analyze.onnxtxt").read_text()
        or "Gemm" in (tmp_path / "01-Analyze.onnxtxt").read_text()
    )
    assert len(result.workload.units) >= 1


def test_pass_failure_names_the_pass_and_those_before() -> None:
    from lamc.errors import InternalError
    from lamc.passes.base import Pass, PassResult

    class Broken(Pass):
        def call(self, model: ir.Model) -> PassResult:
            raise ZeroDivisionError("boom")

    model = _single_op("Relu", [("x", [2])], [2], {})
    with pytest.raises(InternalError, match=r"in pass Broken \(after Analyze\)"):
        PassManager([Analyze({}), Broken()]).run(model)

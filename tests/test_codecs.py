"""Link codecs: planned with their bytes, chosen within the accuracy budget, applied by the
in-process executor exactly as the stage servers apply them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lamc.codecs import encoded_bytes
from lamc.compiler import CompileOptions, compile_model
from lamc.errors import AccuracyError
from lamc.passes.partition.planner import PlanRequest, plan
from lamc.runtime.executor import Pipeline
from lamc.runtime.wire import roundtrip
from lamc.topology import Constraints, load_topology
from tests.compiled import MINIPCS
from tests.conftest import analysed_model

MODEL = "zoo:gpt2:test"


def _compile(out: Path, codec: str, max_error: float) -> object:
    request = PlanRequest(constraints=Constraints(stages=3), codec=codec)
    return compile_model(
        MODEL,
        MINIPCS,
        out,
        CompileOptions(request=request, max_error=max_error),
        analysed=analysed_model(MODEL),
    )


def _codecs(result: object) -> list[str]:
    manifest = result.manifest  # type: ignore[attr-defined]
    return [{t.codec for t in e.tensors}.pop() for e in manifest.edges[1:-1]]


def test_encoded_bytes() -> None:
    assert encoded_bytes(4000, "float32", "fp16") == 2000
    assert encoded_bytes(4000, "float", "int8") == 1000  # IR dtype names too
    assert encoded_bytes(4000, "int64", "int8") == 4000  # ids travel raw
    assert encoded_bytes(2000, "float16", "fp16") == 2000


def test_codec_roundtrip_error_bounds() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    assert np.array_equal(roundtrip(x, "raw"), x)
    assert np.abs(roundtrip(x, "fp16") - x).max() <= np.abs(x).max() * 2**-11
    assert np.abs(roundtrip(x, "int8") - x).max() <= np.abs(x).max() / 127 / 2 + 1e-7
    ids = np.arange(10, dtype=np.int64)
    assert np.array_equal(roundtrip(ids, "int8"), ids)


def test_every_rank_keeps_its_shape_on_the_wire() -> None:
    """A shape's value crossing a cut is a 0-d int64; it arrives 0-d, as do empty tensors
    (a generation step's sensor with no frames)."""
    from lamc.runtime.wire import Tensor, decode, encode

    for array in (
        np.array(7, dtype=np.int64),
        np.zeros((1, 0, 6), np.float32),
        np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
    ):
        message = Tensor.FromString(encode("x", array).SerializeToString())
        back = decode(message)
        assert back.shape == array.shape and back.dtype == array.dtype
        np.testing.assert_array_equal(back, array)


def test_planner_moves_encoded_bytes() -> None:
    workload = analysed_model(MODEL).workload
    topology = load_topology(MINIPCS)
    constraints = Constraints(stages=3)
    raw, _ = plan(workload, topology, PlanRequest(constraints=constraints))
    half, cost = plan(workload, topology, PlanRequest(constraints=constraints, codec="fp16"))
    assert cost.codec == "fp16"
    for a, b in zip(raw.stages[:-1], half.stages[:-1], strict=True):
        if a.end_unit == b.end_unit:
            assert b.transfer_bytes < a.transfer_bytes
            assert b.transfer_ms < a.transfer_ms


def test_auto_chooses_int8_under_a_loose_budget_and_raw_under_a_tight_one(tmp_path: Path) -> None:
    loose = _compile(tmp_path / "loose", "auto", 0.5)
    assert _codecs(loose) == ["int8", "int8"]
    tight = _compile(tmp_path / "tight", "auto", 1e-4)
    assert _codecs(tight) == ["raw", "raw"]
    for result in (loose, tight):
        manifest = result.manifest  # type: ignore[attr-defined]
        assert manifest.plan["measured_error"] <= manifest.plan["max_error"]
    # The lossy pipeline runs with the loss applied, close to but not equal to the raw one.
    feeds = {"input_ids": np.arange(12, dtype=np.int64)[None, :] * 7}
    lossy = Pipeline.open(tmp_path / "loose").run(feeds)["logits"]
    exact = Pipeline.open(tmp_path / "tight").run(feeds)["logits"]
    assert not np.array_equal(lossy, exact)
    assert np.abs(lossy - exact).max() <= 0.5 * np.abs(exact).max()


def test_fixed_codec_over_budget_is_an_accuracy_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(AccuracyError) as info:
        _compile(tmp_path / "out", "int8", 1e-5)
    assert "--codec int8" in str(info.value) and "--max-error" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_validate_uses_the_compiled_budget(tmp_path: Path) -> None:
    from tests.cli.helpers import lamc

    _compile(tmp_path / "out", "fp16", 0.01)
    passed = lamc("validate", str(tmp_path / "out"), "--samples", "1")
    assert passed.code == 0, passed.stdout
    assert "relative error <= 0.01" in passed.stdout
    strict = lamc("validate", str(tmp_path / "out"), "--samples", "1", "--max-error", "1e-7")
    assert strict.code == 7, strict.stdout

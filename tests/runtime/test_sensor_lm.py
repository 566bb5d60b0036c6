"""sensor-lm: a sensor encoder, a projector into the language model's embedding space and a
Llama-style decoder, captured as one model. Its tokens start with the projected sensor
frames; generation through 3 stages (the encoder and projector on the first) gives the
torch model's greedy ids, in process, over stage servers and from `lamc generate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lamc.errors import UsageError
from lamc.runtime.executor import Pipeline
from lamc.runtime.generate import generate, reference_greedy, tokens_of
from lamc.runtime.hosts import Endpoints
from lamc.runtime.remote import RemotePipeline
from tests.compiled import compile_zoo
from tests.conftest import analysed_model
from tests.runtime.servers import StageServers

REF = "zoo:sensor-lm:test,kv=1"
PROMPT = [[5, 17, 42]]
TOKENS = 32


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sensor-lm") / "out"
    compile_zoo(REF, out, 3, split_after=("encoder+projector*", "model.layers.1"))
    return out


def _sensor(seed: int, frames: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, frames, 6)).astype(np.float32)


def test_the_encoder_and_projector_make_the_first_stage(compiled: Path) -> None:
    manifest = Pipeline.open(compiled).manifest
    assert len(manifest.stages) == 3
    assert manifest.inputs[:2] == ("sensor", "input_ids")
    assert manifest.dims["frames"].min == 0  # later steps feed no frames
    first = manifest.stages[0]
    assert "sensor" in first.receives
    assert first.kv_cache is None or not first.kv_cache.past_inputs  # no decoder layer
    assert all(s.kv_cache is not None for s in manifest.stages[1:])


def test_generation_from_sensor_and_prompt_equals_the_torch_model(compiled: Path) -> None:
    pipeline = Pipeline.open(compiled)
    reference = analysed_model(REF).captured.reference
    sensor = _sensor(0)
    got = tokens_of(generate(pipeline, PROMPT, TOKENS, inputs={"sensor": sensor}))
    want = reference_greedy(reference, pipeline.manifest, PROMPT, TOKENS, {"sensor": sensor})
    assert got.shape == (1, TOKENS)
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]
    assert len(set(got[0].tolist())) > 3
    # The same with the caches travelling each step instead of staying in the stages.
    travelling = generate(pipeline, PROMPT, TOKENS, local=False, inputs={"sensor": sensor})
    assert np.array_equal(tokens_of(travelling), got)
    # The sensor matters: other frames (and another number of them) give other tokens.
    other = tokens_of(generate(pipeline, PROMPT, TOKENS, inputs={"sensor": _sensor(1, 20)}))
    assert not np.array_equal(other, got)
    want_other = reference_greedy(
        reference, pipeline.manifest, PROMPT, TOKENS, {"sensor": _sensor(1, 20)}
    )
    assert np.array_equal(other, want_other)


def test_generation_over_stage_servers(compiled: Path) -> None:
    sensor = _sensor(0)
    local = tokens_of(generate(Pipeline.open(compiled), PROMPT, TOKENS, inputs={"sensor": sensor}))
    with (
        StageServers(compiled, 3) as servers,
        RemotePipeline(compiled, Endpoints(dict(enumerate(servers.addresses)))) as client,
    ):
        remote = tokens_of(generate(client, PROMPT, TOKENS, inputs={"sensor": sensor}))
    assert np.array_equal(remote, local)


def test_missing_and_unknown_inputs_are_refused(compiled: Path) -> None:
    pipeline = Pipeline.open(compiled)
    with pytest.raises(UsageError, match=r"also takes sensor: give --input sensor=FILE\.npy"):
        next(generate(pipeline, PROMPT, 4))
    with pytest.raises(UsageError, match="input camera: the model takes sensor"):
        next(generate(pipeline, PROMPT, 4, inputs={"sensor": _sensor(0), "camera": _sensor(0)}))
    with pytest.raises(UsageError, match="12 input positions"):
        next(generate(pipeline, PROMPT, 500, inputs={"sensor": _sensor(0)}))


def test_lamc_generate_takes_the_sensor_from_a_file(compiled: Path, tmp_path: Path) -> None:
    from tests.cli.helpers import lamc

    sensor = _sensor(0)
    np.save(tmp_path / "sensor.npy", sensor[0])  # no batch axis: batch 1
    outcome = lamc(
        "generate", str(compiled), "--input", f"sensor={tmp_path / 'sensor.npy'}",
        "--prompt-ids", ",".join(map(str, PROMPT[0])), "--max-new-tokens", "8", "--json",
    )  # fmt: skip
    assert outcome.code == 0, outcome.stdout + outcome.final
    ids = json.loads(outcome.stdout)["token_ids"]
    local = tokens_of(generate(Pipeline.open(compiled), PROMPT, 8, inputs={"sensor": sensor}))
    assert ids == local[0].tolist()
    missing = lamc("generate", str(compiled), "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert missing.code == 2 and "--input sensor=FILE.npy" in missing.final

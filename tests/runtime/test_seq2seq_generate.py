"""Encoder-decoders captured as one forward (T5, Whisper) generate through 2 stages, in
process and over stage servers, the token ids transformers' own `generate()` gives
(greedy, 32 tokens). Without caches: every step runs the encoder inputs and the decoder's
tokens so far."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lamc.errors import UsageError
from lamc.runtime.executor import Pipeline
from lamc.runtime.generate import generate, tokens_of
from lamc.runtime.hosts import Endpoints
from lamc.runtime.remote import RemotePipeline
from tests.runtime.servers import StageServers

pytest.importorskip("transformers")

TOKENS = 32


def _checkpoint(kind: str, directory: Path) -> tuple[Path, int]:
    """A tiny random T5 or Whisper, initialised wide enough that greedy decoding does not
    repeat one token; (its directory, its decoder start token)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
            num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            initializer_factor=5.0,
        )  # fmt: skip
        model: object = transformers.T5ForConditionalGeneration(config)
    else:
        config = transformers.WhisperConfig(
            vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
            decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=50,
            max_target_positions=40, decoder_start_token_id=1, pad_token_id=0,
            eos_token_id=2, bos_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
            init_std=1.0,
        )  # fmt: skip
        model = transformers.WhisperForConditionalGeneration(config)
    model.eval().save_pretrained(directory / kind)  # type: ignore[attr-defined]
    return directory / kind, int(config.decoder_start_token_id)


def _transformers_tokens(checkpoint: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    import transformers

    source = transformers.AutoConfig.from_pretrained(checkpoint).architectures[0]
    model = getattr(transformers, source).from_pretrained(checkpoint).eval()
    with torch.no_grad():
        out = model.generate(
            **{k: torch.from_numpy(v) for k, v in feeds.items()},
            max_new_tokens=TOKENS, do_sample=False, num_beams=1, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
    return out[:, -TOKENS:].numpy()  # the new tokens (T5's output starts with its start token)


@pytest.mark.parametrize("kind", ["t5", "whisper"])
def test_generation_equals_transformers_in_process_and_over_stage_servers(
    kind: str, tmp_path: Path
) -> None:
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints
    from tests.compiled import MINIPCS

    checkpoint, start = _checkpoint(kind, tmp_path)
    rng = np.random.default_rng(0)
    if kind == "t5":
        feeds = {
            "input_ids": rng.integers(2, 96, size=(1, 7)),
            "attention_mask": np.ones((1, 7), dtype=np.int64),
        }
    else:
        feeds = {"input_features": rng.standard_normal((1, 16, 100)).astype(np.float32)}
    want = _transformers_tokens(checkpoint, feeds)
    assert len(set(want[0].tolist())) > 3  # a real sequence, not one token repeated

    out = tmp_path / "out"
    request = PlanRequest(constraints=Constraints(stages=2))
    compile_model(str(checkpoint), MINIPCS, out, CompileOptions(request=request))
    pipeline = Pipeline.open(out)
    assert len(pipeline.stages) == 2
    local = tokens_of(generate(pipeline, [[start]], TOKENS, inputs=feeds))
    assert np.array_equal(local, want), (local, want)
    with (
        StageServers(out, 2) as servers,
        RemotePipeline(out, Endpoints(dict(enumerate(servers.addresses)))) as client,
    ):
        remote = tokens_of(generate(client, [[start]], TOKENS, inputs=feeds))
    assert np.array_equal(remote, want)
    # From the command line: the encoder's inputs from .npy files (without the batch axis).
    from tests.cli.helpers import lamc

    args = []
    for name, value in feeds.items():
        np.save(tmp_path / f"{name}.npy", value[0])
        args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
    outcome = lamc("generate", str(out), *args, "--prompt-ids", str(start),
                   "--max-new-tokens", "8", "--json")  # fmt: skip
    assert outcome.code == 0, outcome.stdout + outcome.final
    import json

    assert json.loads(outcome.stdout)["token_ids"] == want[0, :8].tolist()
    # The encoder's inputs are needed, and the decoder has only so many positions.
    with pytest.raises(UsageError, match="the encoder's inputs are missing"):
        next(generate(pipeline, [[start]], 4))
    with pytest.raises(UsageError, match="over the"):
        next(generate(pipeline, [[start]], 1000, inputs=feeds))

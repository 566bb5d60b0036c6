"""Generation through compiled decoders: greedy token ids equal the torch model's."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from lamc.errors import UsageError
from lamc.runtime.executor import Pipeline
from lamc.runtime.generate import Sampling, generate, reference_greedy, tokens_of
from lamc.runtime.hosts import Endpoints
from lamc.runtime.kvcache import Step
from lamc.runtime.remote import RemotePipeline, StageFailure
from lamc.runtime.tensors import TensorMismatch
from tests.compiled import compile_zoo
from tests.conftest import analysed_model
from tests.runtime.servers import StageServers

PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11]]
DECODERS = ["zoo:gpt2:test,kv=1", "zoo:llama:test,kv=1"]


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("ref", DECODERS)
def test_greedy_tokens_match_the_torch_model(ref: str, stages: int, tmp_path: Path) -> None:
    compile_zoo(ref, tmp_path / "out", stages)
    pipeline = Pipeline.open(tmp_path / "out")
    assert sum(s.kv_cache is not None for s in pipeline.manifest.stages) == stages
    got = tokens_of(generate(pipeline, PROMPT, 64))
    want = reference_greedy(analysed_model(ref).captured.reference, pipeline.manifest, PROMPT, 64)
    assert got.shape == (1, 64)
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]


@pytest.mark.parametrize(("ref", "stages"), [("zoo:gpt2:test,kv=1", 2), ("zoo:llama:test,kv=1", 3)])
def test_greedy_tokens_over_stage_servers(ref: str, stages: int, tmp_path: Path) -> None:
    out = tmp_path / "out"
    compile_zoo(ref, out, stages)
    local = tokens_of(generate(Pipeline.open(out), PROMPT, 64))
    want = reference_greedy(
        analysed_model(ref).captured.reference, Pipeline.open(out).manifest, PROMPT, 64
    )
    assert np.array_equal(local, want)
    with (
        StageServers(out, stages) as servers,
        RemotePipeline(out, Endpoints(dict(enumerate(servers.addresses)))) as client,
    ):
        remote = tokens_of(generate(client, PROMPT, 64))
        assert client.counts["succeeded"] == 64
        assert np.array_equal(remote, local)
        if stages == 2:
            return
        # Several sequences in flight at once, each stage keeping each one's caches apart.
        prompts = [[[t + i for t in PROMPT[0]]] for i in range(3)]
        alone = [tokens_of(generate(Pipeline.open(out), p, 24)) for p in prompts]
        together: list[np.ndarray | None] = [None] * 3

        def one(i: int) -> None:
            together[i] = tokens_of(generate(client, prompts[i], 24))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(3):
            assert np.array_equal(together[i], alone[i]), i
        # Only the tokens travel from the client; a cache tensor is refused.
        ids = np.asarray(PROMPT, dtype=np.int64)
        with pytest.raises(TensorMismatch, match="unknown tensor"):
            client.run(
                {"input_ids": ids, "past.0.key": np.zeros((1, 4, 0, 16), np.float32)},
                sequence=Step("s", 0),
            )
        # A step for caches a stage does not hold fails, naming the stage and the sequence.
        with pytest.raises(
            StageFailure, match=r"stage 0 has no KV cache for sequence 'gone' at position 8"
        ):
            client.run({"input_ids": ids[:, :1]}, sequence=Step("gone", 8))
    assert np.array_equal(remote, local)
    assert len(set(local[0].tolist())) > 3  # a real sequence, not one token repeated


def test_caches_stay_in_their_stages(tmp_path: Path) -> None:
    """Each stage holds its own layers' caches by sequence, at the sequence's length; only
    hidden states pass between stages; the caches go at the sequence's end (or when the
    caller stops early); the same tokens come out as with caches travelling each step."""
    out = tmp_path / "out"
    compile_zoo("zoo:gpt2:test,kv=1", out, 3)
    pipeline = Pipeline.open(out)
    manifest = pipeline.manifest
    for caches in pipeline.caches:
        assert not [n for n in caches.sends if n.startswith(("past.", "present."))], caches.sends
        assert not [n for n in caches.receives if n.startswith(("past.", "present."))]
    assert manifest.stages[0].kv_cache.length_only  # stage 0 reads later layers' lengths
    steps = generate(pipeline, PROMPT, 12)
    for k in range(5):
        next(steps)
        for stage, caches in zip(manifest.stages, pipeline.caches):
            (entry,) = caches.sequences.values()
            assert sorted(entry.caches) == sorted(stage.kv_cache.past_inputs)
            assert entry.length == len(PROMPT[0]) + k
            assert all(v.shape[2] == entry.length for v in entry.caches.values())
    steps.close()  # stopped early: released
    assert all(len(c) == 0 for c in pipeline.caches)
    local = tokens_of(generate(pipeline, PROMPT, 12))
    assert all(len(c) == 0 for c in pipeline.caches)  # the last step ended the sequence
    travelling = tokens_of(generate(pipeline, PROMPT, 12, local=False))
    assert np.array_equal(local, travelling)


def test_sampling_is_seeded_and_top_1_is_greedy(tmp_path: Path) -> None:
    compile_zoo("zoo:llama:test,kv=1", tmp_path / "out", 2)
    pipeline = Pipeline.open(tmp_path / "out")
    greedy = tokens_of(generate(pipeline, PROMPT, 16))
    top1 = tokens_of(generate(pipeline, PROMPT, 16, Sampling(temperature=1.0, top_k=1)))
    assert np.array_equal(greedy, top1)
    a = tokens_of(generate(pipeline, PROMPT, 16, Sampling(temperature=1.5, seed=3)))
    b = tokens_of(generate(pipeline, PROMPT, 16, Sampling(temperature=1.5, seed=3)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, greedy)
    with pytest.raises(UsageError, match="over the context"):
        list(generate(pipeline, PROMPT, 10_000))


def test_generate_command_streams_tokens(tmp_path: Path) -> None:
    from tests.cli.helpers import lamc

    compile_zoo("zoo:gpt2:test,kv=1", tmp_path / "out", 2)
    outcome = lamc(
        "generate", str(tmp_path / "out"), "--prompt-ids", "5,17,42", "--max-new-tokens", "8"
    )
    assert outcome.code == 0, outcome.stdout
    tokens = outcome.stdout.splitlines()[0].split()
    assert len(tokens) == 8 and all(t.isdigit() for t in tokens)
    assert "8 token(s) after a 3-token prompt" in outcome.final
    bad = lamc("generate", str(tmp_path / "out"), "--prompt-ids", "a,b")
    assert bad.code == 2
    # --json: the same tokens, and JSON is all of stdout.
    import json

    as_json = lamc(
        "generate", str(tmp_path / "out"), "--prompt-ids", "5,17,42", "--max-new-tokens", "8",
        "--json",
    )  # fmt: skip
    assert as_json.code == 0, as_json.stdout + as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["prompt_ids"] == [5, 17, 42] and summary["token_ids"] == [int(t) for t in tokens]
    assert as_json.final.startswith("PASSED generate")


def _tiny_checkpoint(kind: str, directory: Path) -> Path:
    """A random-init causal LM saved as a Hugging Face checkpoint (safetensors)."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=3,
            n_embd=64,
            n_head=4,
            vocab_size=512,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "mistral":  # sliding-window attention: compiled for the window's context
        config = transformers.MistralConfig(
            num_hidden_layers=3,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=256,
            sliding_window=48,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=3,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_hugging_face_decoder_with_its_kv_cache(kind: str, tmp_path: Path) -> None:
    """A transformers checkpoint captured with --kv-cache: flat past/present tensors, the
    caches owned per stage, greedy tokens equal to the transformers model's own."""
    from lamc.compiler import CompileOptions, analyse, compile_model
    from lamc.frontend import CaptureOptions, capture
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints
    from tests.compiled import MINIPCS

    checkpoint = _tiny_checkpoint(kind, tmp_path / kind)
    captured = capture(str(checkpoint), CaptureOptions(kv_cache=True))
    assert captured.kv_cache is not None and len(captured.kv_cache.past_inputs) == 3
    analysed = analyse(str(checkpoint), captured=captured)
    charged = [u.name for u in analysed.workload.units if u.kv_bytes_per_token]
    assert len(charged) == 3, charged  # each layer's cache charged to its own block
    request = PlanRequest(constraints=Constraints(stages=2))
    compile_model(
        str(checkpoint),
        MINIPCS,
        tmp_path / "out",
        CompileOptions(request=request),
        analysed=analysed,
    )
    pipeline = Pipeline.open(tmp_path / "out")
    assert [len(s.kv_cache.layers) for s in pipeline.manifest.stages if s.kv_cache] in (
        [1, 2],
        [2, 1],
    )
    if kind == "mistral":  # the window (48) bounds the context (44), and generate says so
        contexts = {s.kv_cache.max_context for s in pipeline.manifest.stages if s.kv_cache}
        assert contexts == {44}
        with pytest.raises(UsageError, match="over the context"):
            list(generate(pipeline, PROMPT, 40))
    got = tokens_of(generate(pipeline, PROMPT, 32))
    want = reference_greedy(captured.reference, pipeline.manifest, PROMPT, 32)
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]
    # And the transformers model's own generate(): the same tokens.
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    with torch.no_grad():
        own = model.generate(
            torch.tensor(PROMPT),
            max_new_tokens=32,
            do_sample=False,
            min_new_tokens=32,
            pad_token_id=0,
        )
    assert np.array_equal(got, own[:, len(PROMPT[0]) :].numpy())


def test_kv_cache_flag_needs_a_checkpoint_directory() -> None:
    from lamc.frontend import CaptureOptions, capture

    with pytest.raises(UsageError, match="--kv-cache applies to Hugging Face"):
        capture("zoo:gpt2:test", CaptureOptions(kv_cache=True))

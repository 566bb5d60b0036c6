"""Pipelined training on torch.distributed (gloo, one process per stage) computes what one
process computes: the same losses step by step and the same trainable weights at the end,
for full training (GPT-2's tied embedding and head on different stages), LoRA and prompt
tuning (the soft prompt trains on the first stage only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lamc.training.job import Job
from lamc.training.launch import gather, run_local
from lamc.training.worker import run_reference

ROOT = Path(__file__).resolve().parent.parent.parent
MODEL = "zoo:gpt2:test"
CUTS = {2: ("transformer.h.2",), 3: ("transformer.h.1", "transformer.h.3")}
LLAMA = "zoo:llama:test"
LLAMA_CUTS = {2: ("model.layers.2",), 3: ("model.layers.1", "model.norm")}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tokens.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input_ids=rng.integers(0, 512, size=(48, 16)))
    return path


def _job(tokens: Path, method: str, stages: int, steps: int = 20, model: str = MODEL) -> Job:
    # SGD: AdamW divides by the root of the second moment, so a gradient that is zero up
    # to rounding (GPT-2's key bias) moves by the learning rate in one run and not in the
    # other; with SGD the weights' differences stay the size of the gradients'.
    llama = model == LLAMA
    return Job(
        model=model,
        method=method,
        data=str(tokens),
        split_points=(LLAMA_CUTS if llama else CUTS)[stages],
        devices=tuple(f"cpu{k}" for k in range(stages)),
        micro_batches=4,
        micro_batch_size=2,
        steps=steps,
        lr=0.05,
        optimizer="sgd",
        clip=1.0,
        lora_rank=4,
        lora_targets=("q_proj", "v_proj") if llama else ("c_attn",),
        prompt_tokens=4,
    )


@pytest.mark.parametrize(
    ("method", "stages", "model"),
    [
        ("full", 2, MODEL),  # LoRA and prompt over 2 stages: the adapter tests below
        *(
            pytest.param(method, stages, model, marks=pytest.mark.slow)
            for model, stages in ((MODEL, 3), (LLAMA, 2), (LLAMA, 3))
            for method in ("full", "lora", "prompt")
        ),
    ],
)
def test_pipelined_equals_one_process(
    tokens: Path, tmp_path: Path, method: str, stages: int, model: str
) -> None:
    job = _job(tokens, method, stages, model=model)
    records = run_local(job, tmp_path)
    losses, state = run_reference(job)
    got = np.array([r["loss"] for r in records])
    assert [r["step"] for r in records] == list(range(job.steps))
    np.testing.assert_allclose(got, losses, rtol=1e-5)
    assert got[-1] < got[0]  # it learns
    result = gather(job, tmp_path)
    if method == "full":
        from safetensors.numpy import load_file

        trained = load_file(str(result))
    else:
        from safetensors.numpy import load_file

        trained = {}
        for part in sorted(tmp_path.glob("stage-*.safetensors")):
            trained.update(load_file(str(part)))
    assert set(trained) == set(state), sorted(set(trained) ^ set(state))
    for name, value in state.items():
        np.testing.assert_allclose(trained[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_lora_pipelined_equals_one_process_and_loads_in_peft(tokens: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from lamc.training.job import load_module

    job = _job(tokens, "lora", 2)
    records = run_local(job, tmp_path)
    losses, state = run_reference(job)
    np.testing.assert_allclose([r["loss"] for r in records], losses, rtol=1e-5)
    from safetensors.numpy import load_file

    trained: dict[str, np.ndarray] = {}
    for part in sorted(tmp_path.glob("stage-*.safetensors")):
        trained.update(load_file(str(part)))
    assert set(trained) == set(state)
    for name, value in state.items():
        np.testing.assert_allclose(trained[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    adapter = gather(job, tmp_path)
    assert (adapter / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(load_module(MODEL), str(adapter))
    ids = torch.from_numpy(np.load(tokens)["input_ids"][:2])
    reference = load_module(MODEL)
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(
        reference,
        LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0),
    )
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded(ids).numpy(), reference(ids).numpy(), rtol=1e-5, atol=1e-5
        )
    # and the adapter moved the model: the untuned one answers differently
    with torch.no_grad():
        assert not np.allclose(loaded(ids).numpy(), load_module(MODEL)(ids).numpy(), atol=1e-7)

    # Back to deployment: the adapter merged at compile time, the pipeline checked against
    # the peft model (unmerged) by lamc validate, and run here against it directly.
    from lamc.runtime.executor import Pipeline
    from tests.cli.helpers import lamc

    out = tmp_path / "compiled"
    topology = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"
    compiled = lamc("compile", MODEL, "-t", str(topology), "--stages", "2", "--adapter",
                    str(adapter), "-o", str(out))  # fmt: skip
    assert compiled.code == 0, compiled.stdout + compiled.final
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["adapter"] == str(adapter)
    assert len(manifest["model"]["adapter_sha256"]) == 64
    checked = lamc("validate", str(out))
    assert checked.code == 0 and "PASSED" in checked.final, checked.stdout + checked.final
    pipeline = Pipeline.open(out)
    feeds = {pipeline.manifest.inputs[0]: ids.numpy()}
    with torch.no_grad():
        np.testing.assert_allclose(
            next(iter(pipeline.run(feeds).values())), loaded(ids).numpy(), rtol=1e-4, atol=1e-4
        )
    # Against the model without the adapter, the same pipeline fails validation (exit 7).
    untuned = lamc("validate", str(out), "--model", MODEL)
    assert untuned.code == 7, untuned.stdout + untuned.final


def test_a_classifier_trains_pipelined_as_in_one_process_and_compiles_with_its_head(
    tmp_path: Path,
) -> None:
    """A BERT checkpoint (random init) given a 3-class head by its data's labels: LoRA over
    2 stages with padded rows (attention mask) equals one process. Stage 0 holds the
    embeddings only, so it has nothing to train. The adapter (with the head trained whole
    beside it) compiles, and the pipeline answers as the peft model."""
    import torch

    from lamc.frontend import adapter
    from lamc.frontend.hf import spec_from_checkpoint
    from lamc.runtime.executor import Pipeline
    from tests.cli.helpers import lamc

    _tiny_bert(tmp_path / "bert")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, size=(32, 12))
    mask = np.ones_like(ids)
    mask[::3, 8:] = 0  # every third row is padded
    ids[mask == 0] = 0
    data = tmp_path / "labelled.npz"
    np.savez(data, input_ids=ids, attention_mask=mask, labels=rng.integers(0, 3, size=32))
    job = Job(
        model=str(tmp_path / "bert"), method="lora", data=str(data),
        split_points=("model.bert.encoder.layer.0",), devices=("cpu0", "cpu1"),
        micro_batches=4, micro_batch_size=2, steps=8, lr=0.05, optimizer="sgd",
        task="classify", labels=3, lora_rank=4, lora_targets=("query", "value"),
    )  # fmt: skip
    run = tmp_path / "run"
    records = run_local(job, run)
    losses, state = run_reference(job)
    np.testing.assert_allclose([r["loss"] for r in records], losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    from safetensors.numpy import load_file

    trained: dict[str, np.ndarray] = {}
    for part in sorted(run.glob("stage-*.safetensors")):
        trained.update(load_file(str(part)))
    assert any("classifier" in name for name in trained)  # the head trained too
    for name, value in state.items():
        np.testing.assert_allclose(trained[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    result = gather(job, run)
    assert json.loads((result / "lamc_task.json").read_text())["labels"] == 3

    out = tmp_path / "compiled"
    topology = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"
    compiled = lamc("compile", str(tmp_path / "bert"), "-t", str(topology), "--stages", "2",
                    "--adapter", str(result), "-o", str(out), "--dims", "batch=2,seq=12")  # fmt: skip
    assert compiled.code == 0, compiled.stdout + compiled.final
    torch.manual_seed(0)
    base = spec_from_checkpoint(tmp_path / "bert", trust_pickle=False, labels=3).module
    _, peft_model = adapter.apply(base, result)
    pipeline = Pipeline.open(out)
    feeds = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])).numpy()
    got = next(iter(pipeline.run(feeds).values()))
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_prompt_tuning_pipelined_equals_one_process_and_compiles(
    tokens: Path, tmp_path: Path
) -> None:
    """A soft prompt of 4 virtual tokens on GPT-2 over 2 stages: the losses and the prompt
    equal one process's; the adapter (peft's PROMPT_TUNING format) compiles with the prompt
    baked in, and the pipeline takes the base model's inputs and answers as the prompt-tuned
    module, not as the untuned one."""
    import torch

    from lamc.frontend import adapter
    from lamc.runtime.executor import Pipeline
    from lamc.training.job import load_module
    from tests.cli.helpers import lamc

    job = _job(tokens, "prompt", 2)
    records = run_local(job, tmp_path)
    losses, state = run_reference(job)
    got = np.array([r["loss"] for r in records])
    np.testing.assert_allclose(got, losses, rtol=1e-5)
    assert got[-1] < got[0]
    from safetensors.numpy import load_file

    assert list(load_file(str(tmp_path / "stage-0.safetensors"))) == ["base.transformer.wte.prompt"]
    assert not load_file(str(tmp_path / "stage-1.safetensors"))  # nothing trains there
    np.testing.assert_allclose(
        load_file(str(tmp_path / "stage-0.safetensors"))["base.transformer.wte.prompt"],
        state["base.transformer.wte.prompt"], rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    result = gather(job, tmp_path)
    config = json.loads((result / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"]) == (
        "PROMPT_TUNING", "CAUSAL_LM", 4,
    )  # fmt: skip
    tuned, _ = adapter.apply(load_module(MODEL), result)

    out = tmp_path / "compiled"
    topology = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"
    compiled = lamc("compile", MODEL, "-t", str(topology), "--stages", "2", "--adapter",
                    str(result), "-o", str(out))  # fmt: skip
    assert compiled.code == 0, compiled.stdout + compiled.final
    checked = lamc("validate", str(out))
    assert checked.code == 0 and "PASSED" in checked.final, checked.stdout + checked.final
    ids = np.load(tokens)["input_ids"][:2]
    pipeline = Pipeline.open(out)
    logits = next(iter(pipeline.run({pipeline.manifest.inputs[0]: ids}).values()))
    assert logits.shape == (2, 16, 512)  # the given tokens' positions, as the base model's
    with torch.no_grad():
        expected = tuned(torch.from_numpy(ids)).numpy()
        untuned = load_module(MODEL)(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(logits, untuned, atol=1e-3)
    # The context shrank by the prompt: a sequence that fills it no longer fits.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["adapter"] == str(result)


def test_an_encoder_trains_over_three_stages(tmp_path: Path) -> None:
    """A BERT classifier over 3 stages: the attention mask made in stage 0 reaches stage 2
    past stage 1. Loaded with SDPA attention its mask is boolean, so
    torch.distributed.pipelining needs no gradient for it there; LoRA and prompt tuning on
    padded rows equal one process."""
    _tiny_bert(tmp_path / "bert")
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 200, size=(32, 12))
    mask = np.ones_like(ids)
    mask[::2, 7:] = 0
    ids[mask == 0] = 0
    data = tmp_path / "labelled.npz"
    np.savez(data, input_ids=ids, attention_mask=mask, labels=rng.integers(0, 2, size=32))
    for method in ("lora", "prompt"):
        job = Job(
            model=str(tmp_path / "bert"), method=method, data=str(data),
            split_points=("model.bert.encoder.layer.1", "model.bert.encoder.layer.3"),
            devices=("cpu0", "cpu1", "cpu2"), micro_batches=4, micro_batch_size=2, steps=6,
            lr=0.05, optimizer="sgd", task="classify", labels=2, lora_rank=4,
            lora_targets=("query", "value"), prompt_tokens=3,
        )  # fmt: skip
        records = run_local(job, tmp_path / f"run-{method}")
        losses, _ = run_reference(job)
        np.testing.assert_allclose([r["loss"] for r in records], losses, rtol=1e-5)
        assert losses[-1] < losses[0], method


def _tiny_bert(directory: Path) -> None:
    """A 4-layer BERT checkpoint (random init, no dropout) at `directory`."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(config).save_pretrained(directory)

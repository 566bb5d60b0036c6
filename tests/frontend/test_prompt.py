"""A soft prompt (peft PROMPT_TUNING) as lamc bakes it in: the model with the prompt in its
token embedding answers as peft's prompt-tuned model, for a causal LM (logits of the given
tokens) and a sequence classifier (with its trained head); bad adapters are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lamc.errors import UsageError
from lamc.frontend import adapter
from lamc.frontend.hf import spec_from_checkpoint
from lamc.frontend.prompt import save_adapter

TOKENS = 5


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(path)
    return path


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(1)
    ids = torch.from_numpy(rng.integers(1, vocab, size=(2, 9)))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # the second row is padded
    return ids, mask


def test_a_causal_lms_soft_prompt_answers_as_peft(gpt2_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    prompt = torch.randn(TOKENS, 32, generator=torch.Generator().manual_seed(2))
    save_adapter(tmp_path / "adapter", prompt, causal=True)
    tuned, reference = adapter.apply(
        spec_from_checkpoint(gpt2_dir, trust_pickle=False).module, tmp_path / "adapter"
    )
    assert reference is tuned
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(gpt2_dir), str(tmp_path / "adapter")
    ).eval()
    ids, mask = _inputs(100)
    with torch.no_grad():
        got = tuned(ids, mask)
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    assert expected.shape == (2, TOKENS + 9, 100)
    assert got.shape == (2, 9, 100)  # the given tokens' logits
    torch.testing.assert_close(got, expected[:, TOKENS:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = spec_from_checkpoint(gpt2_dir, trust_pickle=False).module(ids, mask)
    assert not torch.allclose(got, plain, atol=1e-3)  # the prompt matters


def test_a_classifiers_soft_prompt_and_head_answer_as_peft(bert_dir: Path, tmp_path: Path) -> None:
    """What `lamc train --method prompt` saves for a classifier (the prompt, the new head
    trained whole) loads in peft, and lamc's baked-in module answers as peft's model."""
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from lamc.frontend.prompt import PromptTuned, save_prompt_tuned
    from lamc.training.job import Job, build_module

    job = Job(model=str(bert_dir), method="prompt", data="unused.npz", split_points=(),
              devices=("cpu0",), task="classify", labels=3, prompt_tokens=TOKENS)  # fmt: skip
    module = build_module(job)
    assert isinstance(module, PromptTuned)
    trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert trainable == [
        "base.model.bert.embeddings.word_embeddings.prompt",
        "base.model.classifier.bias",
        "base.model.classifier.weight",
    ]
    with torch.no_grad():  # "trained": moved off their initial values
        for _, parameter in module.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    save_prompt_tuned(module, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["classifier"])

    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(bert_dir, num_labels=3)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.manual_seed(0)
    lamc_base = spec_from_checkpoint(bert_dir, trust_pickle=False, labels=3).module
    baked, _ = adapter.apply(lamc_base, tmp_path / "adapter")
    ids, mask = _inputs(120)
    module.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(baked(ids, mask), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module(ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_bad_soft_prompts_are_refused(gpt2_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    module = spec_from_checkpoint(gpt2_dir, trust_pickle=False).module
    save_adapter(tmp_path / "wide", torch.zeros(3, 48), causal=True)
    with pytest.raises(UsageError, match=r"48 wide.*is 32"):
        adapter.apply(module, tmp_path / "wide")
    save_adapter(tmp_path / "extra", torch.zeros(3, 32), causal=True)
    save_file(
        {"prompt_embeddings": torch.zeros(3, 32), "lora_A": torch.zeros(2)},
        str(tmp_path / "extra" / "adapter_model.safetensors"),
    )
    with pytest.raises(UsageError, match="unexpected tensor lora_A"):
        adapter.apply(spec_from_checkpoint(gpt2_dir, trust_pickle=False).module, tmp_path / "extra")
    save_adapter(tmp_path / "headless", torch.zeros(3, 32), causal=False,
                 head={"score.weight": torch.zeros(2, 32)})  # fmt: skip
    with pytest.raises(UsageError, match=r"does not have: score\.weight"):
        adapter.apply(
            spec_from_checkpoint(gpt2_dir, trust_pickle=False).module, tmp_path / "headless"
        )
    save_adapter(tmp_path / "miscounted", torch.zeros(3, 32), causal=True)
    config = json.loads((tmp_path / "miscounted" / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = 4
    (tmp_path / "miscounted" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="says 4 virtual tokens; prompt_embeddings has 3"):
        adapter.apply(module, tmp_path / "miscounted")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"adapter_config\.json is not JSON"):
        adapter.apply(module, tmp_path / "broken")


def test_the_context_makes_room_for_the_prompt_and_kv_cache_is_refused(
    gpt2_dir: Path, tmp_path: Path
) -> None:
    from lamc.frontend import CaptureOptions, capture

    save_adapter(tmp_path / "adapter", torch.zeros(60, 32), causal=True)
    captured = capture(str(gpt2_dir), CaptureOptions(adapter=tmp_path / "adapter"))
    seq = next(v for v in captured.model.graph.inputs if v.name == "input_ids").shape[1]
    assert str(seq) == "seq"
    assert captured.dims["seq"] == (1, 4)  # 64 positions, 60 of them the prompt's
    with pytest.raises(UsageError, match="soft prompt with --kv-cache"):
        capture(str(gpt2_dir), CaptureOptions(adapter=tmp_path / "adapter", kv_cache=True))
    save_adapter(tmp_path / "long", torch.zeros(64, 32), causal=True)
    with pytest.raises(UsageError, match="leave no room"):
        capture(str(gpt2_dir), CaptureOptions(adapter=tmp_path / "long"))

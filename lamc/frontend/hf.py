"""A Hugging Face checkpoint directory (config.json + safetensors) -> ModelSpec.

Needs the optional extra `lamc[hf]`. Pickle weights (`pytorch_model.bin`) load only with
`--trust-pickle`: unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lamc.errors import CaptureError, missing_extra
from lamc.models.spec import Dim, ModelSpec

_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def spec_from_checkpoint(
    directory: Path, *, trust_pickle: bool, seq: int = 128, batch: int = 1
) -> ModelSpec:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CaptureError(f"{directory} is not a Hugging Face checkpoint: it has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CaptureError(f"{config_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    has_safetensors = any(directory.glob("*.safetensors"))
    pickles = [p.name for p in map(directory.joinpath, _PICKLE) if p.exists()]
    if not has_safetensors and not pickles:
        raise CaptureError(f"{directory} has no weights (model.safetensors or pytorch_model.bin)")
    if not has_safetensors and not trust_pickle:
        raise CaptureError(
            f"{directory} holds pickle weights ({', '.join(pickles)}), which can run code when loaded",
            hint="convert them to safetensors, or pass --trust-pickle if you trust this checkpoint",
        )
    try:
        import transformers
    except ImportError as exc:
        raise missing_extra("transformers", "hf") from exc

    architectures = config.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(
            str(directory),
            local_files_only=True,
            use_safetensors=has_safetensors,
            attn_implementation="eager",
        )
    except Exception as exc:
        raise CaptureError(
            f"transformers could not load {directory}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    model.eval()
    vocab = int(getattr(model.config, "vocab_size", 30522))
    max_pos = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    t = min(seq, 32, max_pos)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, t), generator=gen)
    mask = torch.ones(2, t, dtype=torch.int64)
    batch_dim, seq_dim = Dim("batch", 1, 64), Dim("seq", 1, max_pos)
    output = "logits" if causal else "last_hidden_state"
    return ModelSpec(
        module=_OutputAdapter(model, output),
        example_inputs={"input_ids": ids, "attention_mask": mask},
        dynamic={
            "input_ids": {0: batch_dim, 1: seq_dim},
            "attention_mask": {0: batch_dim, 1: seq_dim},
        },
        output_names=[output],
        int_ranges={"input_ids": (0, vocab), "attention_mask": (1, 2)},
        name=directory.resolve().name,
        operating_point={"batch": batch, "seq": seq},
    )


class _OutputAdapter(torch.nn.Module):
    """Calls a transformers model and returns one named output tensor."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "return_dict": True,
        }
        if self.output == "logits":
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        result: torch.Tensor = out[self.output]
        return result

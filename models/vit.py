"""Vision Transformer. Configs: `b16` (ViT-B/16 at 224x224, the default), `test` (tiny).

Overrides: `layers=N`, `batch=N`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lamc.models.spec import Dim, ModelSpec, override_int, parse_config, reject_leftovers, seeded


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    hidden_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000


CONFIGS = {
    "b16": ViTConfig(),
    "test": ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_dim=64,
        num_layers=4,
        num_heads=4,
        mlp_dim=128,
        num_classes=10,
    ),
}


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(cfg.hidden_dim, cfg.num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(cfg.hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(cfg.hidden_dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        seq = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.randn(1, seq, cfg.hidden_dim) * 0.02)
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.ln = nn.LayerNorm(cfg.hidden_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embedding
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(
            3, cfg.hidden_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_dim))
        self.encoder = Encoder(cfg)
        self.heads = nn.Linear(cfg.hidden_dim, cfg.num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(pixel_values)
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = self.encoder(torch.cat([cls, x], dim=1))
        return self.heads(x[:, 0])


def build(config: str | None = None) -> ModelSpec:
    base, overrides = parse_config(config, CONFIGS, "b16")
    cfg = replace(
        CONFIGS[base], num_layers=override_int(overrides, "layers", CONFIGS[base].num_layers)
    )
    batch = override_int(overrides, "batch", 1)
    reject_leftovers(overrides)
    gen = seeded(0)
    model = VisionTransformer(cfg).eval()
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen)
    return ModelSpec(
        module=model,
        example_inputs={"pixel_values": pixels},
        dynamic={"pixel_values": {0: Dim("batch", 1, 64)}},
        output_names=["logits"],
        name=f"vit-{base}",
        operating_point={"batch": batch},
    )

"""fusion: a camera encoder and a microphone encoder whose features a fusion head joins,
captured as one model with two inputs. Its two towers are independent until the fusion,
so the partitioner may run them at the same time on different devices (each next to its
sensor) and join them on a third.

- `vision`: a ViT over `pixel_values` `[batch, 3, H, W]` (patch embedding, class token,
  pre-norm transformer blocks);
- `audio`: over the raw waveform `input_values` `[batch, samples]`: a strided 1-D
  convolution stack into frames (wav2vec2's feature encoder, shortened), then transformer
  blocks, mean-pooled;
- `fusion`: the two pooled features, concatenated, through an MLP to `num_classes` logits
  (audio-visual event classification).

Configs: `small` (ViT-S/16 at 224x224 with 8 blocks, a 6-block audio tower over one
second at 16 kHz; the default) and `test` (tiny). Overrides: `batch=N`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lamc.models.spec import Dim, ModelSpec, override_int, parse_config, reject_leftovers, seeded


@dataclass(frozen=True)
class FusionConfig:
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 192
    vision_blocks: int = 6
    vision_heads: int = 3
    samples: int = 16000  # one second at 16 kHz
    audio_width: int = 128
    audio_blocks: int = 4
    audio_heads: int = 4
    fusion_width: int = 256
    num_classes: int = 50


CONFIGS = {
    "small": FusionConfig(),
    "test": FusionConfig(
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_blocks=2,
        vision_heads=2,
        samples=800,
        audio_width=32,
        audio_blocks=2,
        audio_heads=2,
        fusion_width=32,
        num_classes=5,
    ),
}


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        y, _ = self.attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        width = cfg.vision_width
        self.patch = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        patches = (cfg.image_size // cfg.patch_size) ** 2
        self.position = nn.Parameter(torch.randn(1, patches + 1, width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(width, cfg.vision_heads) for _ in range(cfg.vision_blocks)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


class AudioTower(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        width = cfg.audio_width
        # 10 ms hop at 16 kHz: kernel 10 stride 5, then 4 x (3, 2): 5 * 16 = 80 samples.
        layers: list[nn.Module] = [nn.Conv1d(1, width, 10, stride=5), nn.GELU()]
        for _ in range(4):
            layers += [nn.Conv1d(width, width, 3, stride=2), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.blocks = nn.ModuleList(Block(width, cfg.audio_heads) for _ in range(cfg.audio_blocks))
        self.norm = nn.LayerNorm(width)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        x = self.features(input_values[:, None, :]).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.norm(x.mean(dim=1))


class Fusion(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.vision = VisionTower(cfg)
        self.audio = AudioTower(cfg)
        self.fc1 = nn.Linear(cfg.vision_width + cfg.audio_width, cfg.fusion_width)
        self.fc2 = nn.Linear(cfg.fusion_width, cfg.num_classes)

    def forward(self, pixel_values: torch.Tensor, input_values: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([self.vision(pixel_values), self.audio(input_values)], dim=-1)
        return self.fc2(nn.functional.gelu(self.fc1(joint)))


def build(config: str | None = None) -> ModelSpec:
    base, overrides = parse_config(config, CONFIGS, "small")
    cfg = CONFIGS[base]
    batch = override_int(overrides, "batch", 1)
    reject_leftovers(overrides)
    gen = seeded(0)
    with torch.no_grad():
        model = Fusion(cfg).eval()
    batch_dim = Dim("batch", 1, 64)
    inputs = {
        "pixel_values": torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen),
        "input_values": torch.randn(2, cfg.samples, generator=gen),
    }
    return ModelSpec(
        module=model,
        example_inputs=inputs,
        dynamic={"pixel_values": {0: batch_dim}, "input_values": {0: batch_dim}},
        output_names=["logits"],
        name=f"fusion-{base}",
        operating_point={"batch": batch},
    )

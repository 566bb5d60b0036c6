"""sensor-lm: sensor data mapped to tokens of a language model, captured as one model.

Three functional modules, each a unit the partitioner can place:

- `encoder`: a small encoder of a time series or a spectrogram, `[batch, frames,
  channels]` (mel bins, IMU axes, ...): per frame, a linear embedding plus a learned frame
  position, then pre-norm MLP blocks;
- `projector`: a two-layer MLP from the encoder's width into the language model's
  embedding space (as vision-language models project image features);
- `model`, `lm_head`: a Llama-style decoder (RMSNorm, rotary positions, SwiGLU,
  grouped-query attention; the zoo's llama layers).

`forward(sensor, input_ids, *past)`: the decoder's sequence is the projected sensor
frames, then the embedded token ids. With `kv=1` the per-layer KV caches are inputs and
outputs (`past.{i}.key` ...). A generation step after the first feeds the sensor with no
frames (`frames` may be 0): its positions are in the caches already, so only the new
token enters. The logits cover every position the step added (frames + tokens).

Configs: `small` (80 mel bins, 8 decoder layers of width 512; the default) and `test`
(6 channels, the llama test config's decoder). Overrides: `kv=1`, `layers=N`, `seq=N`,
`frames=N` (the operating point's frames), `batch=N`.

Users' own sensor encoders follow the same factory contract (README, "Sensor to tokens").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lamc.models.llama import CONFIGS as LLAMA_CONFIGS
from lamc.models.llama import LlamaConfig, LlamaModel
from lamc.models.spec import (
    Dim,
    ModelSpec,
    decoder_spec,
    override_bool,
    override_int,
    parse_config,
    reject_leftovers,
    seeded,
)

# The default decoder: 8 layers of width 512 (about 50M parameters with its vocabulary).
SMALL_LM = LlamaConfig(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=1024,
)


@dataclass(frozen=True)
class SensorLMConfig:
    channels: int = 80  # per frame: mel bins, or a time series' channels
    max_frames: int = 256
    encoder_width: int = 384
    encoder_blocks: int = 4
    lm: LlamaConfig = SMALL_LM


CONFIGS = {
    "small": SensorLMConfig(),
    "test": SensorLMConfig(
        channels=6, max_frames=32, encoder_width=32, encoder_blocks=2, lm=LLAMA_CONFIGS["test"]
    ),
}


class FrameBlock(nn.Module):
    """A pre-norm MLP applied to every frame on its own."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class SensorEncoder(nn.Module):
    """[batch, frames, channels] -> [batch, frames, width]; zero frames give zero rows."""

    def __init__(self, cfg: SensorLMConfig) -> None:
        super().__init__()
        self.frame_in = nn.Linear(cfg.channels, cfg.encoder_width)
        self.position = nn.Parameter(torch.zeros(cfg.max_frames, cfg.encoder_width))
        self.blocks = nn.ModuleList(
            FrameBlock(cfg.encoder_width) for _ in range(cfg.encoder_blocks)
        )
        self.norm = nn.LayerNorm(cfg.encoder_width)

    def forward(self, sensor: torch.Tensor) -> torch.Tensor:
        x = self.frame_in(sensor) + self.position[: sensor.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class SensorProjector(nn.Module):
    """The encoder's features into the language model's embedding space."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SensorLM(nn.Module):
    """`forward(sensor, input_ids, *past)`; past = k0, v0, k1, v1, ... (KV heads)."""

    def __init__(self, cfg: SensorLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = SensorEncoder(cfg)
        self.projector = SensorProjector(cfg.encoder_width, cfg.lm.hidden_size)
        self.model = LlamaModel(cfg.lm)
        self.lm_head = nn.Linear(cfg.lm.hidden_size, cfg.lm.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.encoder.position, std=0.02)

    def forward(
        self, sensor: torch.Tensor, input_ids: torch.Tensor, *past: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        tokens = self.projector(self.encoder(sensor))
        x = torch.cat([tokens, self.model.embed_tokens(input_ids)], dim=1)
        x, presents = self.model.run_layers(x, past)
        logits = self.lm_head(self.model.norm(x))
        if past:
            return (logits, *presents)
        return logits


def build(config: str | None = None) -> ModelSpec:
    base, overrides = parse_config(config, CONFIGS, "small")
    cfg = CONFIGS[base]
    lm = replace(
        cfg.lm, num_hidden_layers=override_int(overrides, "layers", cfg.lm.num_hidden_layers)
    )
    cfg = replace(cfg, lm=lm)
    kv = override_bool(overrides, "kv", False)
    seq = override_int(overrides, "seq", 16 if base == "test" else 64)
    frames = override_int(overrides, "frames", 8 if base == "test" else 64)
    batch = override_int(overrides, "batch", 1)
    reject_leftovers(overrides)
    if not 0 <= frames <= cfg.max_frames:
        raise ValueError(f"frames={frames}: the encoder takes 0 to {cfg.max_frames} frames")

    gen = seeded(0)
    with torch.no_grad():
        model = SensorLM(cfg).eval()
    batch_dim = Dim("batch", 1, 64)
    # 0 frames: a generation step after the first (the sensor's positions are cached).
    frames_dim = Dim("frames", 0, cfg.max_frames)
    seq_dim = Dim("seq", 1, lm.max_position_embeddings - cfg.max_frames)
    inputs = {
        "sensor": torch.randn(2, 4, cfg.channels, generator=gen),
        "input_ids": torch.randint(0, lm.vocab_size, (2, min(seq, 32)), generator=gen),
    }
    dynamic: dict[str, dict[int, Dim]] = {
        "sensor": {0: batch_dim, 1: frames_dim},
        "input_ids": {0: batch_dim, 1: seq_dim},
    }
    return decoder_spec(
        model,
        inputs,
        dynamic,
        name=f"sensor-lm-{base}",
        vocab=lm.vocab_size,
        operating_point={"batch": batch, "frames": frames, "seq": seq},
        kv=kv,
        batch_dim=batch_dim,
        generator=gen,
        layers=lm.num_hidden_layers,
        kv_heads=lm.num_key_value_heads,
        head_dim=lm.hidden_size // lm.num_attention_heads,
        max_context=lm.max_position_embeddings,
        layer_scope="model.layers.{i}",
    )

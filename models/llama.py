"""Llama (decoder-only): RMSNorm, rotary position embeddings, SwiGLU, grouped-query attention.

Parameter names as in Hugging Face's LlamaForCausalLM. Configs: `1b` (TinyLlama-1.1B
shape, the default), `test` (4 tiny layers, 4 query heads over 2 KV heads).
Overrides: `kv=1`, `layers=N`, `seq=N`, `batch=N`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

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


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


CONFIGS = {
    "1b": LlamaConfig(),
    "test": LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
    ),
}


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past_key is not None and past_value is not None:
            k = torch.cat([past_key, k], dim=2)
            v = torch.cat([past_value, v], dim=2)
        present_k, present_v = k, v
        # Grouped-query attention: each KV head serves n_head / n_kv query heads.
        rep = self.n_head // self.n_kv
        s = k.shape[2]
        k = (
            k.unsqueeze(2)
            .expand(b, self.n_kv, rep, s, self.head_dim)
            .reshape(b, self.n_head, s, self.head_dim)
        )
        v = (
            v.unsqueeze(2)
            .expand(b, self.n_kv, rep, s, self.head_dim)
            .reshape(b, self.n_head, s, self.head_dim)
        )
        if past_key is not None:
            past = past_key.shape[2]
            q_pos = torch.arange(t, device=x.device).unsqueeze(1) + past
            k_pos = torch.arange(past + t, device=x.device).unsqueeze(0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.o_proj(y), present_k, present_v


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_key, past_value)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(
            cfg.hidden_size // cfg.num_attention_heads, cfg.rope_theta
        )

    def run_layers(
        self, x: torch.Tensor, past: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder layers over embeddings `x` [batch, t, hidden], whose positions
        follow the cache's; (hidden states, the layers' presents when `past` is given)."""
        offset = past[0].shape[2] if past else 0
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0) + offset
        cos, sin = self.rotary_emb(positions)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if past:
                x, k, v = layer(x, cos, sin, past[2 * i], past[2 * i + 1])
                presents += [k, v]
            else:
                x, _, _ = layer(x, cos, sin)
        return x, presents


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids, *past)`; past = k0, v0, k1, v1, ... (KV heads, not repeated)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(
        self, input_ids: torch.Tensor, *past: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x, presents = self.model.run_layers(self.model.embed_tokens(input_ids), past)
        logits = self.lm_head(self.model.norm(x))
        if past:
            return (logits, *presents)
        return logits


def build(config: str | None = None) -> ModelSpec:
    base, overrides = parse_config(config, CONFIGS, "1b")
    cfg = replace(
        CONFIGS[base],
        num_hidden_layers=override_int(overrides, "layers", CONFIGS[base].num_hidden_layers),
        max_position_embeddings=override_int(
            overrides, "context", CONFIGS[base].max_position_embeddings
        ),
    )
    kv = override_bool(overrides, "kv", False)
    seq = override_int(overrides, "seq", 16 if base == "test" else 128)
    batch = override_int(overrides, "batch", 1)
    reject_leftovers(overrides)

    gen = seeded(0)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
    batch_dim = Dim("batch", 1, 64)
    seq_dim = Dim("seq", 1, cfg.max_position_embeddings)
    inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (2, min(seq, 32)), generator=gen)}
    dynamic: dict[str, dict[int, Dim]] = {"input_ids": {0: batch_dim, 1: seq_dim}}
    return decoder_spec(
        model,
        inputs,
        dynamic,
        name=f"llama-{base}",
        vocab=cfg.vocab_size,
        operating_point={"batch": batch, "seq": seq},
        kv=kv,
        batch_dim=batch_dim,
        generator=gen,
        layers=cfg.num_hidden_layers,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_context=cfg.max_position_embeddings,
        layer_scope="model.layers.{i}",
    )

"""GPT-2 (decoder-only transformer), parameter names as in Hugging Face's GPT2LMHeadModel.

Configs: `small` (124M, the default), `medium` (355M), `test` (4 tiny layers).
Overrides: `kv=1` exposes an explicit KV cache (past inputs, present outputs),
`layers=N`, `seq=N` (example sequence length), `batch=N`.
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
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_eps: float = 1e-5


CONFIGS = {
    "small": GPT2Config(),
    "medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "test": GPT2Config(n_layer=4, n_head=4, n_embd=64, vocab_size=512, n_positions=256),
}


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(
        self, x: torch.Tensor, past_key: torch.Tensor | None, past_value: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        if past_key is not None and past_value is not None:
            k = torch.cat([past_key, k], dim=2)
            v = torch.cat([past_value, v], dim=2)
            past = past_key.shape[2]
            # Query i sits at position past + i and sees keys 0 .. past + i.
            q_pos = torch.arange(t, device=x.device).unsqueeze(1) + past
            k_pos = torch.arange(past + t, device=x.device).unsqueeze(0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.c_proj(y), k, v


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn(self.ln_1(x), past_key, past_value)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


class GPT2Transformer(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with a tied LM head. `forward(input_ids, *past)`; past = k0, v0, k1, v1, ..."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self, input_ids: torch.Tensor, *past: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        t = input_ids.shape[1]
        offset = past[0].shape[2] if past else 0
        positions = torch.arange(t, device=input_ids.device).unsqueeze(0) + offset
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        presents: list[torch.Tensor] = []
        for i, block in enumerate(self.transformer.h):
            if past:
                x, k, v = block(x, past[2 * i], past[2 * i + 1])
                presents += [k, v]
            else:
                x, _, _ = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if past:
            return (logits, *presents)
        return logits


def build(config: str | None = None) -> ModelSpec:
    base, overrides = parse_config(config, CONFIGS, "small")
    cfg = replace(CONFIGS[base], n_layer=override_int(overrides, "layers", CONFIGS[base].n_layer))
    kv = override_bool(overrides, "kv", False)
    seq = override_int(overrides, "seq", 16 if base == "test" else 128)
    batch = override_int(overrides, "batch", 1)
    reject_leftovers(overrides)

    gen = seeded(0)
    model = GPT2LMHeadModel(cfg).eval()
    batch_dim = Dim("batch", 1, 64)
    seq_dim = Dim("seq", 1, cfg.n_positions)
    # Traced at batch 2 so torch.export keeps the dim symbolic; planned at `batch`.
    inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (2, min(seq, 32)), generator=gen)}
    dynamic: dict[str, dict[int, Dim]] = {"input_ids": {0: batch_dim, 1: seq_dim}}
    return decoder_spec(
        model,
        inputs,
        dynamic,
        name=f"gpt2-{base}",
        vocab=cfg.vocab_size,
        operating_point={"batch": batch, "seq": seq},
        kv=kv,
        batch_dim=batch_dim,
        generator=gen,
        layers=cfg.n_layer,
        kv_heads=cfg.n_head,
        head_dim=cfg.n_embd // cfg.n_head,
        max_context=cfg.n_positions,
        layer_scope="transformer.h.{i}",
    )

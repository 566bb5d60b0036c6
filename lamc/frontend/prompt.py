"""A soft prompt: N trainable embeddings in front of every input (prompt tuning), as peft's
PROMPT_TUNING adapter defines it.

The model sees N + T positions: the N virtual tokens, then the T given ones. peft feeds
`inputs_embeds`; lamc keeps the model's own interface instead (zoo models take token ids
only): `PromptTuned` puts N placeholder ids in front of the input (and N ones in front of
the attention mask), and the model's token embedding, wrapped in `PromptedEmbedding`, puts
the prompt's rows where the placeholders' embeddings were. Positions, masks and token types
are then those of N + T tokens, as under peft. The prompt lives in the token embedding, so
in a pipeline it is on the first stage.

A causal LM's outputs are cut back to the T given positions (logits for the user's tokens,
as the base model's interface has them); a classifier's are whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lamc.errors import UsageError

PROMPT_KEY = "prompt_embeddings"  # peft's name for the prompt in adapter_model.safetensors
WEIGHTS = "adapter_model.safetensors"


class PromptedEmbedding(torch.nn.Module):
    """A token embedding whose first N positions are the soft prompt."""

    def __init__(self, inner: torch.nn.Embedding, prompt: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.tokens = int(prompt.shape[0])
        self.prompt = torch.nn.Parameter(prompt.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embedded = self.inner(ids)
        front = self.prompt.to(embedded.dtype).unsqueeze(0).expand(embedded.shape[0], -1, -1)
        return torch.cat([front, embedded[:, self.tokens :]], dim=1)


class PromptTuned(torch.nn.Module):
    """`base` with a soft prompt of `tokens` rows in front of its input ids.

    `forward(input_ids[, attention_mask])`: the base's inputs; `causal`: its first output
    has a sequence axis, cut back to the given tokens' positions."""

    def __init__(self, base: torch.nn.Module, prompt: torch.Tensor, *, causal: bool) -> None:
        super().__init__()
        path = input_embedding_path(base)
        owner_path, _, leaf = path.rpartition(".")
        owner = base.get_submodule(owner_path) if owner_path else base
        inner = getattr(owner, leaf)
        if int(prompt.shape[1]) != int(inner.embedding_dim):
            raise UsageError(
                f"the soft prompt is {int(prompt.shape[1])} wide; the model's token "
                f"embedding ({path}) is {int(inner.embedding_dim)}"
            )
        setattr(owner, leaf, PromptedEmbedding(inner, prompt))
        self.base = base
        self.tokens = int(prompt.shape[0])
        self.causal = causal
        self.embedding_path = path

    def get_base_model(self) -> torch.nn.Module:
        return self.base

    @property
    def prompt(self) -> torch.nn.Parameter:
        embedding = self.base.get_submodule(self.embedding_path)
        assert isinstance(embedding, PromptedEmbedding)
        return embedding.prompt

    def forward(self, input_ids: torch.Tensor, *rest: torch.Tensor) -> Any:
        batch = input_ids.shape[0]
        # Any valid id will do: its embedding is replaced by the prompt's row.
        filler = torch.zeros(batch, self.tokens, dtype=input_ids.dtype, device=input_ids.device)
        tensors = [torch.cat([filler, input_ids], dim=1)]
        if rest:  # the attention mask: the virtual tokens are attended to
            mask = rest[0]
            ones = torch.ones(batch, self.tokens, dtype=mask.dtype, device=mask.device)
            tensors += [torch.cat([ones, mask], dim=1), *rest[1:]]
        out = self.base(*tensors)
        if not self.causal:
            return out
        if isinstance(out, tuple):
            return (out[0][:, self.tokens :], *out[1:])
        return out[:, self.tokens :]


def input_embedding_path(module: torch.nn.Module) -> str:
    """The path of the module's token embedding: the one transformers names
    (`get_input_embeddings`), else the first `nn.Embedding` (the zoo's)."""
    target = None
    for owner in (module, getattr(module, "model", None)):
        getter = getattr(owner, "get_input_embeddings", None)
        if callable(getter):
            try:
                target = getter()
            except NotImplementedError:
                target = None
            if target is not None:
                break
    for name, sub in module.named_modules():
        if sub is target or (target is None and isinstance(sub, torch.nn.Embedding)):
            if not isinstance(sub, torch.nn.Embedding):
                break
            return name
    raise UsageError("the model has no token embedding (nn.Embedding) to put a soft prompt in")


def initial_prompt(module: torch.nn.Module, tokens: int, seed: int) -> torch.Tensor:
    """`tokens` rows of the model's own token embedding, drawn at random (seeded): a start
    on the scale of real token embeddings."""
    if tokens < 1:
        raise UsageError(f"--prompt-tokens must be at least 1, got {tokens}")
    embedding = module.get_submodule(input_embedding_path(module))
    assert isinstance(embedding, torch.nn.Embedding)
    rows = torch.randint(
        0, embedding.num_embeddings, (tokens,), generator=torch.Generator().manual_seed(seed)
    )
    return embedding.weight.detach()[rows].clone()


def save_adapter(
    where: Path,
    prompt: torch.Tensor,
    *,
    causal: bool,
    head: dict[str, torch.Tensor] | None = None,
    config: Any = None,
) -> None:
    """A peft PROMPT_TUNING adapter directory: adapter_config.json and
    adapter_model.safetensors (`prompt_embeddings`; a classifier's head as peft names the
    modules it saves whole, `base_model.<name>`)."""
    from safetensors.torch import save_file

    where.mkdir(parents=True, exist_ok=True)
    tensors = {PROMPT_KEY: prompt.detach().contiguous().clone()}
    for name, tensor in (head or {}).items():
        tensors[f"base_model.{name}"] = tensor.detach().contiguous().clone()
    save_file(tensors, str(where / WEIGHTS), metadata={"format": "pt"})
    heads = sorted({name.split(".")[0] for name in head or {}})
    settings = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM" if causal else "SEQ_CLS",
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": _config_int(config, "num_attention_heads", "n_head"),
        "num_layers": _config_int(config, "num_hidden_layers", "n_layer"),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": heads or None,
        "auto_mapping": None,
    }
    (where / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def load_adapter(where: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """(the prompt, a classifier head's weights by their names in the base model, whether
    the adapter is a causal LM's) of a PROMPT_TUNING adapter directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = json.loads((where / "adapter_config.json").read_text())
    try:
        tensors = load_file(str(where / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"--adapter {where}: {WEIGHTS} is not readable ({exc})") from None
    prompt = tensors.pop(PROMPT_KEY, None)
    if prompt is None or prompt.ndim != 2:
        raise UsageError(f"--adapter {where}: {WEIGHTS} has no {PROMPT_KEY} [tokens, width]")
    declared = config.get("num_virtual_tokens")
    if declared is not None and declared != int(prompt.shape[0]):
        raise UsageError(
            f"--adapter {where}: adapter_config.json says {declared} virtual tokens; "
            f"{PROMPT_KEY} has {int(prompt.shape[0])}"
        )
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UsageError(
            f"--adapter {where}: a soft prompt for an encoder-decoder's two parts; lamc "
            "bakes in prompts of one"
        )
    head: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not name.startswith("base_model."):
            raise UsageError(f"--adapter {where}: an unexpected tensor {name} in {WEIGHTS}")
        head[name.removeprefix("base_model.")] = tensor
    task = str(config.get("task_type") or "CAUSAL_LM")
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UsageError(
            f"--adapter {where}: a {task} soft prompt; lamc bakes in CAUSAL_LM and SEQ_CLS ones"
        )
    return prompt, head, task == "CAUSAL_LM"


def transformers_model(base: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model inside a checkpoint's module (lamc wraps it as `.model`),
    or None for a zoo module."""
    inner = getattr(base, "model", None)
    has_config = hasattr(getattr(inner, "config", None), "to_dict")
    return inner if isinstance(inner, torch.nn.Module) and has_config else None


def save_prompt_tuned(module: PromptTuned, where: Path) -> None:
    """A trained `PromptTuned` as a peft adapter: its prompt, and the parameters of the
    base that trained beside it (a classifier's head), named as in the transformers model."""
    root = transformers_model(module.base)
    head: dict[str, torch.Tensor] = {}
    if root is not None:
        prompt_id = id(module.prompt)
        head = {
            name: parameter
            for name, parameter in root.named_parameters()
            if parameter.requires_grad and id(parameter) != prompt_id
        }
    config = getattr(root, "config", None)
    save_adapter(where, module.prompt, causal=module.causal, head=head, config=config)

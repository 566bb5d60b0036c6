"""`--adapter`: a fine-tuning result applied to the source module before capture.

What `lamc train` writes (or any peft adapter directory) deploys through the usual path:

- a peft LoRA adapter (`adapter_config.json` + weights): loaded onto the module with
  `PeftModel.from_pretrained`, then merged into the weights it adapts, so the captured
  graph is the plain architecture with fine-tuned weights. The reference `lamc validate`
  compares against is the peft model itself, unmerged;
- a peft prompt-tuning adapter (`PROMPT_TUNING`: `prompt_embeddings`, a classifier's head):
  the prompt baked into the module's token embedding (`lamc.frontend.prompt`), so the
  captured graph takes the same inputs as the base model;
- full weights (`model.safetensors`, or a safetensors file): loaded into the module by
  parameter name; every name must be one of the module's and every shape must match;
- a `lamc train` run directory: its `adapter/` or `model.safetensors`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lamc.errors import UsageError


def resolve(path: Path) -> Path:
    """The adapter directory or weights file that `path` names."""
    if path.is_dir() and (path / "run.json").is_file():
        run = json.loads((path / "run.json").read_text())
        path = path / str(run.get("result", ""))
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return path
    if path.is_dir() and (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    if path.is_file() and path.suffix == ".safetensors":
        return path
    raise UsageError(
        f"--adapter {path}: not a peft adapter directory (adapter_config.json), a "
        "safetensors file of weights, or a lamc train run",
    )


TASK_FILE = "lamc_task.json"


def classes(path: Path) -> int | None:
    """The number of classes of the classifier a `lamc train` adapter was trained as (the
    head the checkpoint must be given before the adapter applies), if it was one."""
    found = resolve(path)
    task = (found if found.is_dir() else found.parent) / TASK_FILE
    if not task.is_file():
        return None
    try:
        labels = json.loads(task.read_text()).get("labels")
    except ValueError:
        raise UsageError(f"--adapter {found}: {TASK_FILE} is not JSON") from None
    if not isinstance(labels, int) or labels < 1:
        raise UsageError(f"--adapter {found}: {TASK_FILE} names no number of labels")
    return labels


def digest(path: Path) -> str:
    """sha256 over the adapter's files (names and bytes), for the manifest."""
    from lamc.verify import files_sha256

    return files_sha256(
        sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    )


def apply(module: Any, path: Path) -> tuple[Any, Any]:
    """(the module to capture, the reference module): `path` applied to `module`."""
    path = resolve(path)
    if path.is_dir():
        return _peft(module, path)
    return _full(module, path)


def _peft(module: Any, path: Path) -> tuple[Any, Any]:
    try:
        from peft import PeftModel
    except ImportError:
        from lamc.errors import missing_extra

        raise missing_extra("peft", "train") from None
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except ValueError as exc:
        raise UsageError(f"--adapter {path}: adapter_config.json is not JSON ({exc})") from None
    kind = str(config.get("peft_type", "")) if isinstance(config, dict) else ""
    if kind == "PROMPT_TUNING":
        return _prompt(module, path)
    if kind != "LORA":
        raise UsageError(
            f"--adapter {path}: a {kind or 'unknown'} adapter; lamc compiles LoRA and "
            "prompt-tuning adapters and full weights",
        )
    try:
        reference = PeftModel.from_pretrained(module, str(path)).eval()
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise UsageError(f"--adapter {path}: does not fit the model ({exc})") from None
    merged = copy.deepcopy(reference).merge_and_unload()
    return merged.eval(), reference


def _prompt(module: Any, path: Path) -> tuple[Any, Any]:
    """A soft prompt baked in: the module with the prompt in its token embedding (and a
    classifier's trained head loaded), its own reference."""
    from lamc.frontend.prompt import PromptTuned, load_adapter, transformers_model

    prompt, head, causal = load_adapter(path)
    if head:
        root = transformers_model(module)
        if root is None:
            raise UsageError(f"--adapter {path}: a head for a Hugging Face model; this is not one")
        _load_checked(root, head, path)
    tuned = PromptTuned(module, prompt.float(), causal=causal)
    return tuned.eval(), tuned


def _load_checked(module: Any, state: dict[str, Any], path: Path) -> None:
    """Load `state` into `module` by name, refusing unknown names and other shapes."""
    own = dict(module.state_dict())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise UsageError(
            f"--adapter {path}: weights the model does not have: {', '.join(unknown[:5])}"
        )
    wrong = [
        f"{name} {list(tensor.shape)} (the model's is {list(own[name].shape)})"
        for name, tensor in state.items()
        if tuple(tensor.shape) != tuple(own[name].shape)
    ]
    if wrong:
        raise UsageError(f"--adapter {path}: shapes differ: {', '.join(wrong[:3])}")
    module.load_state_dict(state, strict=False)


def _full(module: Any, path: Path) -> tuple[Any, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"--adapter {path}: not a readable safetensors file ({exc})") from None
    _load_checked(module, state, path)
    return module.eval(), module

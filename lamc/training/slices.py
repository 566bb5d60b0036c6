"""Per-stage weight slices of a pipelined training run: each stage process loads only its
own stage's weights.

The launching host (the one that holds the checkpoint) builds the module once, seeded, with
what trains marked (a LoRA adapter's initial values, a soft prompt, a new classifier head),
splits it at the plan's cuts exactly as the stage processes do, and writes each stage's
tensors to `RUN/slices/stage-K.safetensors`: its parameters, buffers (a rotary embedding's
frequencies) and the constants its graph reads. `RUN/slices/slices.json` lists every file
with its size and sha256, and per stage which names share one tensor (GPT-2's embedding and
head when one stage holds both).

A stage process builds the module's skeleton on PyTorch's meta device (no memory for
weights), splits it the same way, checks its slice's size and sha256 against the listing
(exit 9, naming the file, where either differs), and puts the slice's tensors into its
stage. Any tensor of the stage the slice does not supply is an error naming it, never an
uninitialised weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lamc.atomic import replace_file
from lamc.errors import IntegrityError
from lamc.paths import safe_path, sha256_file

SLICES = "slices"
LISTING = "slices.json"


def stage_file(rank: int) -> str:
    return f"{SLICES}/stage-{rank}.safetensors"


def _tensors(stage: Any) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """The stage module's tensors by dotted name (each shared tensor once), the names that
    alias one of them, and what each name is (parameter, buffer, constant)."""
    import torch

    found: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    kinds: dict[str, str] = {}
    first: dict[int, str] = {}

    def add(name: str, tensor: Any, kind: str) -> None:
        owner = first.setdefault(id(tensor), name)
        if owner != name:
            aliases[name] = owner
            return
        found[name] = tensor
        kinds[name] = kind

    for name, parameter in stage.named_parameters(remove_duplicate=False):
        add(name, parameter, "parameter")
    for name, buffer in stage.named_buffers(remove_duplicate=False):
        add(name, buffer, "buffer")
    # Tensors the exported graphs (the stage's and its submodules') read as attributes.
    for prefix, module in stage.named_modules():
        graph = getattr(module, "graph", None)
        for node in getattr(graph, "nodes", ()):
            if node.op != "get_attr":
                continue
            name = f"{prefix}.{node.target}" if prefix else str(node.target)
            if name not in found and name not in aliases:
                value = _attribute(module, str(node.target))
                if isinstance(value, torch.Tensor):
                    add(name, value, "constant")
    return found, aliases, kinds


def _attribute(module: Any, dotted: str) -> Any:
    value = module
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _owner(module: Any, dotted: str) -> tuple[Any, str]:
    *path, attr = dotted.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def write(pipe: Any, stages: int, run_dir: Path) -> dict[str, Any]:
    """Write every stage's slice of the split module `pipe` (a torch.distributed.pipelining
    `Pipe`) and their listing; the listing."""
    from safetensors.torch import save_file

    folder = run_dir / SLICES
    folder.mkdir(parents=True, exist_ok=True)
    listing: dict[str, Any] = {"stages": []}
    for rank in range(stages):
        stage = pipe.get_stage_module(rank)
        tensors, aliases, kinds = _tensors(stage)
        relative = stage_file(rank)
        path = run_dir / relative
        contents = {name: t.detach().contiguous() for name, t in tensors.items()}
        replace_file(path, lambda tmp, c=contents: save_file(c, str(tmp)))  # type: ignore[misc]
        listing["stages"].append(
            {
                "path": relative,
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
                "aliases": aliases,
                "kinds": kinds,
            }
        )
    text = json.dumps(listing, indent=1, sort_keys=True) + "\n"
    replace_file(folder / LISTING, lambda tmp: tmp.write_text(text))
    return listing


def load_into(stage: Any, run_dir: Path, rank: int) -> None:
    """Put stage `rank`'s slice into `stage` (built on the meta device), after checking the
    slice's size and sha256 against the listing."""
    import torch
    from safetensors.torch import load_file

    try:
        listing = json.loads((run_dir / SLICES / LISTING).read_text())
        entry = listing["stages"][rank]
        relative, size, digest = str(entry["path"]), int(entry["size"]), str(entry["sha256"])
        listed_aliases = dict(entry["aliases"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise IntegrityError(
            f"{run_dir / SLICES / LISTING}: no usable listing of stage {rank}'s weights ({exc})"
        ) from None
    path = safe_path(run_dir, relative, "slices")
    if not path.is_file():
        raise IntegrityError(f"{relative}: missing")
    if path.stat().st_size != size:
        raise IntegrityError(
            f"{relative}: size {path.stat().st_size} bytes, the listing says {size}"
        )
    if sha256_file(path) != digest:
        raise IntegrityError(f"{relative}: sha256 differs from the listing (modified)")
    loaded = load_file(str(path))
    expected, aliases, kinds = _tensors(stage)
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing or extra or listed_aliases != aliases:
        raise IntegrityError(
            f"{relative}: holds other tensors than stage {rank} has (missing {missing[:3]}, "
            f"unexpected {extra[:3]}, or other shared names): written for another split?"
        )
    placed: dict[str, Any] = {}
    for name, tensor in loaded.items():
        old = expected[name]
        if tuple(old.shape) != tuple(tensor.shape) or old.dtype != tensor.dtype:
            raise IntegrityError(
                f"{relative}: {name} is {tuple(tensor.shape)} {tensor.dtype}, the stage "
                f"has {tuple(old.shape)} {old.dtype}"
            )
        owner, attr = _owner(stage, name)
        kind = kinds.get(name)
        if kind == "parameter":
            value: Any = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
            owner._parameters[attr] = value
        elif kind == "buffer":
            value = tensor
            owner._buffers[attr] = value
        else:
            value = tensor
            setattr(owner, attr, value)
        placed[name] = value
    for name, target in aliases.items():
        owner, attr = _owner(stage, name)
        value = placed[target]
        if isinstance(value, torch.nn.Parameter):
            owner._parameters[attr] = value
        elif attr in owner._buffers:
            owner._buffers[attr] = value
        else:
            setattr(owner, attr, value)
    _off_meta(stage)
    now, _, _ = _tensors(stage)
    left = [name for name, tensor in now.items() if tensor.device.type == "meta"]
    if left:
        raise IntegrityError(f"{relative}: stage {rank}'s {left[0]} was not in its slice")


def _off_meta(stage: Any) -> None:
    """A graph traced from a skeleton names the meta device where the model created a
    tensor on its weights' device (a position range, a mask): those run on the CPU."""
    import torch
    import torch.fx

    meta, cpu = torch.device("meta"), torch.device("cpu")

    def swap(value: Any) -> Any:
        if isinstance(value, torch.device) and value == meta:
            return cpu
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    for module in stage.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        changed = False
        for node in graph.nodes:
            args, kwargs = swap(node.args), swap(node.kwargs)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed = True
        if changed and isinstance(module, torch.fx.GraphModule):
            module.recompile()

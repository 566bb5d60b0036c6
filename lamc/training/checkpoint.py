"""Checkpoints of a training run, for `lamc train --resume RUN`.

`RUN/checkpoints/step-NNNNNN/` holds one safetensors file per stage: the stage's trainable
weights, their optimiser state and the process's random-number state, each weight under
the module's own parameter name, so a run resumed on another split finds every weight
whichever stage holds it now. Each file is written beside its place and renamed into it;
`complete.json` is written last, once every stage has written its file: a checkpoint
without it (a stage died while writing) is ignored. A new complete checkpoint removes the
older ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lamc.atomic import replace_file

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def latest(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint in `run_dir`, if any."""
    found = []
    for path in (run_dir / CHECKPOINTS).glob("step-*"):
        marker = path / COMPLETE
        if marker.is_file():
            found.append(int(json.loads(marker.read_text())["step"]))
    return max(found) if found else None


def save(
    run_dir: Path,
    step: int,
    rank: int,
    named: list[tuple[str, Any]],
    optimizer: Any,
    skip: set[int],
) -> None:
    """Stage `rank`'s part of the checkpoint taken after `step` steps. `skip`: copies of
    tied weights another stage saves."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {"rng": torch.get_rng_state()}
    for name, parameter in named:
        if id(parameter) in skip:
            continue
        tensors[f"param:{name}"] = parameter.detach().contiguous().clone()
        for key, value in optimizer.state.get(parameter, {}).items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state:{name}:{key}"] = tensor.detach().contiguous().clone()
    folder = step_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    replace_file(folder / f"stage-{rank}.safetensors", lambda p: save_file(tensors, str(p)))


def mark_complete(run_dir: Path, step: int, stages: int) -> None:
    """Called once every stage has saved: the checkpoint counts, the older ones go."""
    folder = step_dir(run_dir, step)
    record = json.dumps({"step": step, "stages": stages}) + "\n"
    replace_file(folder / COMPLETE, lambda p: p.write_text(record))
    for older in (run_dir / CHECKPOINTS).glob("step-*"):
        if older != folder:
            shutil.rmtree(older, ignore_errors=True)


def restore(
    run_dir: Path,
    step: int,
    rank: int,
    named: list[tuple[str, Any]],
    optimizer: Any,
    tied: list[list[str]],
    stages: int,
) -> None:
    """Load this stage's trainable weights and optimiser state from the checkpoint of
    `step` (saved by any split); the random-number state too when the split is the one
    that saved it (the same number of stages)."""
    import torch
    from safetensors.torch import load_file

    folder = step_dir(run_dir, step)
    saved_stages = int(json.loads((folder / COMPLETE).read_text())["stages"])
    merged: dict[str, Any] = {}
    rngs = []
    for k in range(saved_stages):
        loaded = load_file(str(folder / f"stage-{k}.safetensors"))
        rngs.append(loaded.pop("rng"))
        merged.update(loaded)
    # A tied weight was saved once, under the name of the stage that owned it.
    saved_as = {
        name: next((n for n in group if f"param:{n}" in merged), name)
        for group in tied
        for name in group
    }
    with torch.no_grad():
        for name, parameter in named:
            key = saved_as.get(name, name)
            if f"param:{key}" not in merged:
                raise KeyError(f"checkpoint step {step} has no weight {name}")
            parameter.copy_(merged[f"param:{key}"])
            prefix = f"state:{key}:"
            # Each copy of a tied weight gets state of its own: optimisers update in place.
            state = {k[len(prefix) :]: v.clone() for k, v in merged.items() if k.startswith(prefix)}
            if state:
                optimizer.state[parameter] = state
    if saved_stages == stages:
        torch.set_rng_state(rngs[rank])

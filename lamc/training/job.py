"""What every stage process of a training run is told (RUN/job.json), and what all of
them compute the same way: the module, its trainable parameters, the data order, the loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lamc.errors import UsageError


@dataclass(frozen=True)
class Job:
    model: str
    method: str  # lora | full
    data: str  # an .npz with input_ids [N, T] (int)
    split_points: tuple[str, ...]  # module paths where stages 1.. begin
    devices: tuple[str, ...]  # the plan's device of each stage
    micro_batches: int = 8
    micro_batch_size: int = 1
    steps: int = 20
    lr: float = 1e-3
    optimizer: str = "adamw"
    schedule: str = "1f1b"
    seed: int = 0
    clip: float = 0.0  # max gradient norm (0: none)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ()
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    start_step: int = 0  # a resumed run starts here, from the checkpoint of this step
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> Job:
        data = json.loads(path.read_text())
        for key in ("split_points", "devices", "lora_targets"):
            data[key] = tuple(data[key])
        return cls(**data)


def build_module(job: Job) -> Any:
    """The source module with what trains marked (the same on every process: seeded)."""
    import torch

    module = load_module(job.model)
    if job.method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(job.seed)
        config = LoraConfig(
            r=job.lora_rank,
            lora_alpha=job.lora_alpha,
            target_modules=list(job.lora_targets),
            lora_dropout=0.0,
        )
        module = get_peft_model(module, config)
    module.train()
    return module


def module_prefix(job: Job) -> str:
    """peft wraps the module: its paths gain this prefix."""
    return "base_model.model." if job.method == "lora" else ""


def check_source(ref: str) -> None:
    """Refuse, with the reason, a model a training run cannot build in its processes."""
    if not ref.startswith("zoo:") and not Path(ref).is_dir():
        raise UsageError(
            f"{ref}: lamc train runs zoo models and Hugging Face checkpoint directories"
        )


def load_module(ref: str) -> Any:
    """The PyTorch module of a zoo model or a Hugging Face checkpoint directory."""
    check_source(ref)
    if ref.startswith("zoo:"):
        from lamc import models

        _, name, *rest = ref.split(":", 2)
        return models.build(name, rest[0] if rest else None).module
    from lamc.frontend.hf import spec_from_checkpoint

    return spec_from_checkpoint(Path(ref), trust_pickle=False).module


def load_tokens(path: str) -> np.ndarray:
    """input_ids [N, T] from an .npz; refused with the reason when it is not that."""
    file = Path(path)
    if file.suffix != ".npz" or not file.is_file():
        raise UsageError(f"--data {path}: give an .npz file with input_ids [samples, tokens]")
    with np.load(file, allow_pickle=False) as data:
        if "input_ids" not in data:
            raise UsageError(f"--data {path}: no input_ids array (it has {', '.join(data)})")
        ids = data["input_ids"]
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] < 2:
        raise UsageError(
            f"--data {path}: input_ids must be integers [samples, tokens >= 2], "
            f"got {ids.dtype} {list(ids.shape)}"
        )
    return ids.astype(np.int64)


def step_rows(step: int, per_step: int, samples: int) -> np.ndarray:
    """The data rows of step `step`, in order, wrapping around the data set."""
    return (np.arange(per_step) + step * per_step) % samples


def causal_lm_loss(logits: Any, target: Any) -> Any:
    """Next-token cross entropy: logits at t predict the token at t + 1."""
    import torch

    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), target[:, 1:].reshape(-1)
    )


def make_optimizer(job: Job, params: list[Any]) -> Any:
    import torch

    if job.optimizer == "sgd":
        return torch.optim.SGD(params, lr=job.lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=job.lr)

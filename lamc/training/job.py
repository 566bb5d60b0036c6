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
    method: str  # lora | prompt | full
    data: str  # an .npz (input_ids [N, T], attention_mask, labels) or a JSONL of texts
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
    prompt_tokens: int = 20  # prompt: the soft prompt's virtual tokens
    task: str = "causal-lm"  # causal-lm | classify (sequence classification) | custom
    dropout: float | None = None  # every dropout layer's probability (None: the model's)
    labels: int = 0  # classify: the number of classes (the head the model gets)
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    start_step: int = 0  # a resumed run starts here, from the checkpoint of this step
    # Data parallelism: each replica's micro-batches of every step (one process a device,
    # each the whole model); empty: a pipeline of stages.
    replicas: tuple[int, ...] = ()
    # Replicated stages: for each stage, each member's micro-batches of every step (one
    # process a member, `devices` listing them stage by stage); empty: one process a stage.
    stage_groups: tuple[tuple[int, ...], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def processes(self) -> int:
        """One process a stage, a stage's member, or a replica."""
        if self.replicas:
            return len(self.replicas)
        if self.stage_groups:
            return sum(len(g) for g in self.stage_groups)
        return len(self.split_points) + 1

    @property
    def stages(self) -> int:
        return len(self.split_points) + 1

    def stage_of(self, rank: int) -> int:
        """The stage process `rank` runs (a replica runs the whole model: stage 0)."""
        if self.replicas:
            return 0
        for stage, group in enumerate(self.stage_groups):
            if rank < len(group):
                return stage
            rank -= len(group)
        return rank

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> Job:
        data = json.loads(path.read_text())
        for key in ("split_points", "devices", "lora_targets", "replicas"):
            data[key] = tuple(data.get(key, ()))
        data["stage_groups"] = tuple(tuple(g) for g in data.get("stage_groups", ()))
        return cls(**data)


def build_module(job: Job, weights: bool = True) -> Any:
    """The source module with what trains marked (the same on every process: seeded).
    `weights=False`: a Hugging Face checkpoint's architecture without reading its weights
    (for a skeleton built on the meta device, `build_skeleton`)."""
    import torch

    torch.manual_seed(job.seed)  # a classification head is initialised from it
    module = load_module(job.model, labels=job.labels, weights=weights)
    if job.dropout is not None:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.p = job.dropout
    if job.method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(job.seed)
        config = LoraConfig(
            r=job.lora_rank,
            lora_alpha=job.lora_alpha,
            target_modules=list(job.lora_targets),
            lora_dropout=0.0,
            # A new classification head trains whole beside the adapters, and is saved
            # with them.
            modules_to_save=head_modules(module) if job.task == "classify" else None,
        )
        module = get_peft_model(module, config)
    elif job.method == "prompt":
        from lamc.frontend.prompt import PromptTuned, initial_prompt

        module.requires_grad_(False)
        if job.task == "classify":  # the new head trains whole beside the prompt
            heads = set(head_modules(module))
            for name, sub in module.named_modules():
                if name.rsplit(".", 1)[-1] in heads:
                    sub.requires_grad_(True)
        prompt = initial_prompt(module, job.prompt_tokens, job.seed)
        module = PromptTuned(module, prompt, causal=job.task != "classify")
    module.train()
    return module


def build_skeleton(job: Job) -> Any:
    """The module as `build_module` makes it, on PyTorch's meta device: its structure and
    which parameters train, with no memory for weights (a stage then loads its own slice,
    `lamc.training.slices`). A module that cannot be built there (a factory that reads its
    own weights) is built whole, and says so on stderr."""
    import sys

    import torch

    try:
        with torch.device("meta"):
            return build_module(job, weights=False)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        print(
            f"the module could not be built on the meta device ({reason}); building it whole",
            file=sys.stderr,
        )
        return build_module(job)


def head_modules(module: Any) -> list[str]:
    """The names of a sequence classifier's head (transformers calls it `classifier` or
    `score`)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    found = [n for n in ("classifier", "score") if n in names]
    if not found:
        raise UsageError("the model has no classification head (classifier or score)")
    return found


def module_prefix(job: Job) -> str:
    """peft (LoRA) and a soft prompt wrap the module: its paths gain this prefix."""
    return {"lora": "base_model.model.", "prompt": "base."}.get(job.method, "")


def check_source(ref: str) -> None:
    """Refuse, with the reason, a model a training run cannot build in its processes."""
    if not ref.startswith("zoo:") and not Path(ref).is_dir() and not is_factory(ref):
        raise UsageError(
            f"{ref}: lamc train runs zoo models, Hugging Face checkpoint directories and "
            "factories (file.py:factory, pkg.module:factory)"
        )


def is_factory(ref: str) -> bool:
    """`file.py:factory` or `pkg.module:factory` (not a zoo name, not a path on disk)."""
    return ":" in ref and not ref.startswith("zoo:") and not Path(ref).exists()


def user_loss(ref: str) -> Any:
    """The loss a factory's ModelSpec names (`loss`), or None."""
    if not is_factory(ref):
        return None
    from lamc.frontend import factory_spec

    return factory_spec(ref).loss


def load_module(ref: str, labels: int = 0, weights: bool = True) -> Any:
    """The PyTorch module of a zoo model or a Hugging Face checkpoint directory; with
    `labels`, the checkpoint as a sequence classifier with that many classes;
    `weights=False`: a checkpoint's architecture, its weights not read."""
    check_source(ref)
    if ref.startswith("zoo:"):
        if labels:
            raise UsageError(f"{ref}: sequence classification runs Hugging Face checkpoints")
        from lamc import models

        _, name, *rest = ref.split(":", 2)
        return models.build(name, rest[0] if rest else None).module
    if is_factory(ref):
        from lamc.frontend import factory_spec

        return factory_spec(ref).module
    from lamc.frontend.hf import spec_from_checkpoint

    spec = spec_from_checkpoint(
        Path(ref), trust_pickle=False, labels=labels or None, attention="sdpa", weights=weights
    )
    return spec.module


@dataclass
class Dataset:
    """What a run trains on: token ids, their attention mask, and labels for a classifier
    (a causal LM's targets are its own ids)."""

    input_ids: np.ndarray  # [N, T] int64
    attention_mask: np.ndarray  # [N, T] int64 (all ones when the data has none)
    labels: np.ndarray | None = None  # [N] int64 class indices
    label_names: tuple[str, ...] = ()

    @property
    def task(self) -> str:
        return "classify" if self.labels is not None else "causal-lm"

    def take(self, rows: np.ndarray) -> Dataset:
        return Dataset(
            self.input_ids[rows],
            self.attention_mask[rows],
            None if self.labels is None else self.labels[rows],
            self.label_names,
        )


def load_data(path: str, model: str | None = None) -> Dataset:
    """An .npz (`input_ids` [N, T] integers; `attention_mask` [N, T] and `labels` [N]
    optional) or a JSONL file of `{"text": ..., "label": ...}` lines tokenised with the
    checkpoint's own tokenizer (`label` optional: with it, sequence classification);
    refused with the reason when it is neither."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--data {path}: no such file")
    if file.suffix == ".jsonl":
        return _load_jsonl(file, model)
    if file.suffix != ".npz":
        raise UsageError(f"--data {path}: give an .npz of input_ids or a .jsonl of texts")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data}
    except (ValueError, OSError) as exc:
        raise UsageError(f"--data {path}: not a readable .npz ({exc})") from None
    if "input_ids" not in arrays:
        raise UsageError(f"--data {path}: no input_ids array (it has {', '.join(arrays)})")
    ids = arrays["input_ids"]
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] < 2:
        raise UsageError(
            f"--data {path}: input_ids must be integers [samples, tokens >= 2], "
            f"got {ids.dtype} {list(ids.shape)}"
        )
    mask = arrays.get("attention_mask", np.ones_like(ids))
    if mask.shape != ids.shape or mask.dtype.kind not in "iub":
        raise UsageError(f"--data {path}: attention_mask must be integers shaped as input_ids")
    labels = arrays.get("labels")
    if labels is not None and (labels.shape != (len(ids),) or labels.dtype.kind not in "iu"):
        raise UsageError(f"--data {path}: labels must be integers [samples]")
    names: tuple[str, ...] = ()
    if labels is not None:
        if labels.min() < 0:
            raise UsageError(f"--data {path}: labels must be class indices from 0")
        names = tuple(str(k) for k in range(int(labels.max()) + 1))
        labels = labels.astype(np.int64)
    return Dataset(ids.astype(np.int64), mask.astype(np.int64), labels, names)


def _load_jsonl(file: Path, model: str | None) -> Dataset:
    import json as _json

    if model is None or not Path(model).is_dir():
        raise UsageError(
            f"--data {file}: texts need the model's tokenizer, which a Hugging Face "
            "checkpoint directory has (give zoo models an .npz of input_ids)"
        )
    texts: list[str] = []
    labels: list[str] = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = _json.loads(line)
        except ValueError as exc:
            raise UsageError(f"--data {file}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UsageError(
                f'--data {file}:{number}: each line is {{"text": "...", "label": ...}}'
            )
        texts.append(row["text"])
        if "label" in row:
            labels.append(str(row["label"]))
    if not texts:
        raise UsageError(f"--data {file}: no texts")
    if labels and len(labels) != len(texts):
        raise UsageError(f"--data {file}: some lines have a label and some do not")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--data {file}: {model} has no tokenizer lamc can load ({exc})") from None
    # One length for every row (pipeline stages exchange fixed shapes): the longest text's.
    encoded = tokenizer(
        texts, padding="longest", truncation=True, max_length=512, return_tensors="np"
    )
    names = tuple(sorted(set(labels)))
    index = {name: k for k, name in enumerate(names)}
    return Dataset(
        np.asarray(encoded["input_ids"], dtype=np.int64),
        np.asarray(encoded["attention_mask"], dtype=np.int64),
        np.array([index[x] for x in labels], dtype=np.int64) if labels else None,
        names,
    )


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


def classify_loss(logits: Any, labels: Any) -> Any:
    """Cross entropy of a sequence classifier's logits [B, classes] against labels [B]."""
    import torch

    return torch.nn.functional.cross_entropy(logits, labels)


def loss_of(task: str, model: str = "") -> Any:
    """The loss of a step: a factory's own (task `custom`), a classifier's, a causal LM's."""
    if task == "custom":
        loss = user_loss(model)
        if loss is None:
            raise UsageError(f"{model}: its ModelSpec names no loss")
        return loss
    return classify_loss if task == "classify" else causal_lm_loss


def takes_mask(module: Any) -> bool:
    """Whether the module's forward takes the attention mask after the ids (checkpoint
    directories' modules do; the zoo's take ids only)."""
    import inspect

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    names = getattr(base, "inputs", None)  # a checkpoint's module names what it takes
    if isinstance(names, tuple):
        return "attention_mask" in names
    return "attention_mask" in inspect.signature(base.forward).parameters


class _NothingToTrain:
    """The optimiser of a stage without trainable parameters (under LoRA, a stage of
    embeddings only): it steps nothing."""

    def __init__(self) -> None:
        self.state: dict[Any, Any] = {}

    def zero_grad(self) -> None:
        pass

    def step(self) -> None:
        pass


def make_optimizer(job: Job, params: list[Any]) -> Any:
    import torch

    if not params:
        return _NothingToTrain()

    if job.optimizer == "sgd":
        return torch.optim.SGD(params, lr=job.lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=job.lr)

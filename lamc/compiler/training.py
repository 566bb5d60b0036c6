"""Planning a training run (`lamc train --dry-run`): which parameters train, unit by unit,
the training step's cost tables, the exact pipeline over the topology and the baselines.

What trains comes from the source PyTorch module (the units are its submodules):

- full: every parameter;
- lora: rank-r adapters (A: in x r, B: r x out) on the target projections, named as peft
  names them (`--lora-targets`; defaults per architecture: GPT-2 `c_attn`, Llama and
  Mistral `q_proj,v_proj`, BERT `query,value`); the base weights stay frozen;
- prompt: N virtual token embeddings in front of the input, at the first unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lamc.compiler.analysis import Analysed
from lamc.cost import CostModel
from lamc.errors import UsageError
from lamc.passes.partition import hybrid as hybrid_search
from lamc.passes.partition.training import TrainingProblem, TrainingSolution, solve
from lamc.passes.partition.training_baselines import (
    TrainingAlternative,
    alternatives,
    data_parallel,
)
from lamc.topology import Topology
from lamc.training_cost import TrainingCost, TrainingSpec

# peft's own defaults for these architectures, by the projection names they use.
LORA_DEFAULTS = (("c_attn",), ("q_proj", "v_proj"), ("query", "value"), ("qkv",))
BYTES_PER_PARAM = 4  # trainable weights, their gradients and optimiser states in fp32


@dataclass(frozen=True)
class TrainingOptions:
    spec: TrainingSpec
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ()  # empty: the architecture's default
    prompt_tokens: int = 20


@dataclass
class TrainingPlan:
    cost: TrainingCost
    problem: TrainingProblem
    solution: TrainingSolution | None
    baselines: tuple[TrainingAlternative, ...]
    # Every device with the whole model, when that beats every pipeline (else None).
    replicated: TrainingAlternative | None
    trainable_params: int
    targets: tuple[str, ...]  # LoRA: the module names adapted
    samples_per_step: int
    lora_rank: int = 8
    prompt_tokens: int = 20
    # The best pipeline whose stages may run on groups of devices, when one of its stages
    # is replicated and it beats every chain and data parallelism (else None); `hybrid_note`
    # says why it was not searched.
    hybrid: hybrid_search.HybridSolution | None = None
    hybrid_note: str = ""

    def samples_per_s(self, step_ms: float) -> float:
        return self.samples_per_step * 1000.0 / step_ms if math.isfinite(step_ms) else 0.0


def plan_training(
    analysed: Analysed,
    topology: Topology,
    options: TrainingOptions,
    *,
    compare: bool = False,
    replicate: bool = True,
) -> TrainingPlan:
    """The training plan; `replicate`: also search pipelines whose stages may run on groups
    of devices (`passes.partition.hybrid`)."""
    module = _source_module(analysed)
    units = analysed.workload.units
    owners = _unit_modules(module, [u.name for u in units])
    tokens = math.prod(analysed.workload.binding.values()) or 1
    batch = int(analysed.workload.binding.get("batch", 1))
    n = len(units)
    trainable = np.zeros(n)
    share = np.zeros(n)
    adapter_flops = np.zeros(n)
    targets: tuple[str, ...] = ()
    method = options.spec.method
    if method == "full":
        # Every parameter of the module, a tied one once (with its first owner); one no
        # unit names stays with the first unit rather than vanish from the budget.
        for name, parameter in module.named_parameters():
            unit = owners.get(name.rsplit(".", 1)[0] if "." in name else "", 0)
            trainable[unit] += parameter.numel() * BYTES_PER_PARAM
        share[:] = 1.0
    elif method == "lora":
        targets = options.lora_targets or _default_targets(module)
        found = 0
        for name, child in module.named_modules():
            if name.rsplit(".", 1)[-1] not in targets:
                continue
            shape = _matrix_shape(child)
            if shape is None:
                continue
            owner = owners.get(name)
            if owner is None:
                continue
            found += 1
            fan_in, fan_out = shape
            trainable[owner] += options.lora_rank * (fan_in + fan_out) * BYTES_PER_PARAM
            adapter_flops[owner] += 2.0 * tokens * options.lora_rank * (fan_in + fan_out)
        if not found:
            raise UsageError(
                f"no Linear module named {', '.join(targets)} in the model",
                hint="name the projections to adapt: --lora-targets NAME,...",
            )
    else:  # prompt
        _check_room_for_prompt(analysed, options.prompt_tokens)
        hidden = _embedding_width(module)
        trainable[0] = options.prompt_tokens * hidden * BYTES_PER_PARAM
    saved = np.array([_saved_bytes(u) for u in units])
    inference = CostModel(analysed.workload, topology)
    cost = TrainingCost(
        inference,
        options.spec,
        trainable_bytes=trainable,
        trainable_matrix_share=share,
        saved_bytes=saved,
        adapter_flops=adapter_flops,
    )
    problem = TrainingProblem.from_cost(cost)
    try:
        solution = solve(problem)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    everywhere = data_parallel(cost, problem)
    best_pipeline = solution.step_ms if solution is not None else math.inf
    hybrid, hybrid_note = (
        _hybrid(cost, problem, min(best_pipeline, everywhere.step_ms)) if replicate else (None, "")
    )
    if hybrid is not None:
        everywhere_better = False
    else:
        everywhere_better = everywhere.step_ms < best_pipeline * (1 - 1e-9)
    return TrainingPlan(
        cost=cost,
        problem=problem,
        solution=solution,
        baselines=alternatives(cost, problem) if compare else (),
        replicated=everywhere if everywhere_better else None,
        trainable_params=int(trainable.sum() // BYTES_PER_PARAM),
        targets=targets,
        samples_per_step=batch * options.spec.micro_batches,
        lora_rank=options.lora_rank,
        prompt_tokens=options.prompt_tokens,
        hybrid=hybrid,
        hybrid_note=hybrid_note,
    )


def _hybrid(
    cost: TrainingCost, problem: TrainingProblem, best_ms: float
) -> tuple[hybrid_search.HybridSolution | None, str]:
    """The best pipeline of device groups when a replicated stage makes it faster than
    `best_ms` (the best chain's and data parallelism's step), with a note when the search
    did not run."""
    names = [d.name for d in cost.devices]
    count = len(names)
    if count < 2:
        return None, ""
    if not hybrid_search.searchable(count, cost.n):
        return None, (
            f"replicated stages not searched: {count} devices and {cost.n} units are past "
            f"the exact search's budget (4^devices x (units + 1)^2 <= "
            f"{hybrid_search.WORK_BUDGET:,}: 4 devices and 12 units, 3 and 25, 2 and 51)"
        )
    topology = cost.inference.topology
    latency = np.zeros((count, count))
    per_byte = np.zeros((count, count))
    probe = 1e6  # bytes: the slope of a transfer's time
    for a in range(count):
        for b in range(count):
            if a != b:
                fixed = topology.transfer_ms(names[a], names[b], 0.0)
                latency[a, b] = fixed
                per_byte[a, b] = (topology.transfer_ms(names[a], names[b], probe) - fixed) / probe
    found = hybrid_search.solve(
        hybrid_search.HybridProblem(problem, cost.trainable, latency, per_byte)
    )
    # One group of every device is data parallelism, costed as such beside the plan.
    if found is None or not found.replicated:
        return None, ""
    if len(found.stages) == 1 and len(found.stages[0].members) == count:
        return None, ""
    if found.step_ms >= best_ms * (1 - 1e-9):
        return None, ""
    return found, ""


def _source_module(analysed: Analysed) -> Any:
    module = getattr(analysed.captured.reference, "module", None)
    if module is None:
        raise UsageError(
            f"{analysed.captured.source}: lamc train needs the PyTorch module (a zoo model, "
            "a factory or a Hugging Face checkpoint), not an ONNX file"
        )
    return module


def _unit_modules(module: Any, unit_names: list[str]) -> dict[str, int]:
    """Module qualified name -> the unit that holds it. A unit is named by the module
    paths it covers ("a+b"); the source module may wrap the model (a prefix)."""
    parts = [(k, p) for k, name in enumerate(unit_names) for p in name.split("+") if p]
    owners: dict[str, int] = {}
    for qualified, _ in module.named_modules():
        dotted = f".{qualified}."
        for k, part in parts:
            # the unit's module itself, or one inside it, under any wrapper's prefix
            if f".{part}." in dotted:
                owners[qualified] = k
                break
    return owners


def _matrix_shape(child: Any) -> tuple[int, int] | None:
    """(fan in, fan out) of a Linear or GPT-2 Conv1D module; None for anything else."""
    import torch

    if isinstance(child, torch.nn.Linear):
        return int(child.in_features), int(child.out_features)
    weight = getattr(child, "weight", None)
    if type(child).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])  # stored (in, out)
    return None


def _default_targets(module: Any) -> tuple[str, ...]:
    names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    for targets in LORA_DEFAULTS:
        if all(t in names for t in targets):
            return targets
    raise UsageError(
        "no default LoRA targets for this architecture",
        hint="name the projections to adapt: --lora-targets NAME,...",
    )


def _check_room_for_prompt(analysed: Analysed, tokens: int) -> None:
    """The virtual tokens and the planned sequence together fit the model's positions."""
    captured = analysed.captured
    first = captured.model.graph.inputs[0]
    axis = first.shape[1] if first.shape is not None and len(first.shape) > 1 else None
    name = getattr(axis, "value", None)
    if not isinstance(name, str) or name not in captured.dims:
        return
    longest = captured.dims[name][1]
    planned = int(analysed.workload.binding.get(name, 1))
    if planned + tokens > longest:
        raise UsageError(
            f"--prompt-tokens {tokens} and {name}={planned} make {planned + tokens} "
            f"positions; the model takes at most {longest}",
            hint="fewer virtual tokens, or a shorter sequence (--dims)",
        )


def _embedding_width(module: Any) -> int:
    from lamc.frontend.prompt import input_embedding_path

    return int(module.get_submodule(input_embedding_path(module)).embedding_dim)


def _saved_bytes(unit: Any) -> float:
    """Activation bytes a unit keeps for its backward per micro-batch: each operator's
    output, about half of the activation traffic it moves (the other half is its
    inputs, the previous operator's outputs)."""
    return float(sum(max(op.moved_bytes - op.weight_bytes, 0.0) for op in unit.ops)) / 2.0

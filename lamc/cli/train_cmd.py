"""`lamc train MODEL -t T.yaml --method lora|prompt|full --dry-run [--compare]`: the
training plan over the topology (stages, step time, memory per stage) and the baselines."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import click

from lamc.cli.common import analyse_model, model_options, require_compile_extra
from lamc.cli.main import CommandOutcome, cli, lamc_command
from lamc.errors import ExitCode, UsageError


@cli.command("train")
@click.argument("model", required=False)
@click.option(
    "--topology",
    "-t",
    "topology_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Topology file (YAML): the devices that train together.",
)
@click.option(
    "--method",
    type=click.Choice(["lora", "prompt", "full"]),
    default="lora",
    show_default=True,
    help="What trains: LoRA adapters, a soft prompt, or every parameter.",
)
@click.option(
    "--micro-batches",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Micro-batches per optimiser step (what the pipeline schedule overlaps).",
)
@click.option(
    "--schedule",
    type=click.Choice(["1f1b", "gpipe"]),
    default="1f1b",
    show_default=True,
    help="Pipeline schedule: 1F1B keeps fewer micro-batches' activations per stage.",
)
@click.option(
    "--optimizer",
    "optimiser",
    type=click.Choice(["adamw", "adam", "sgd"]),
    default="adamw",
    show_default=True,
    help="Optimiser of the trainable parameters.",
)
@click.option(
    "--lora-rank",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="LoRA: the rank of each adapter.",
)
@click.option(
    "--lora-targets",
    metavar="NAME,...",
    help="Projections to adapt (peft's target_modules); default per architecture.",
)
@click.option(
    "--prompt-tokens",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Prompt tuning: the number of virtual tokens.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Plan only: print the stages, the step time and each stage's memory.",
)
@click.option(
    "--compare",
    is_flag=True,
    help="Beside the plan: equal split, memory-proportional split, one device, data parallel.",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Training data: an .npz (input_ids [samples, tokens]; attention_mask, labels "
    'optional) or a .jsonl of {"text": ..., "label": ...} lines (checkpoint directories: '
    "their tokenizer). Labels train a sequence classifier; without them, a causal LM.",
)
@click.option(
    "-o",
    "--output",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The run's directory: run.json, and the adapter (peft) or model.safetensors.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Optimiser steps to run.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="Learning rate.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the initial weights of new parameters, the data order and dropout.",
)
@click.option(
    "--clip",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Clip the gradients' global norm to this (0: no clipping).",
)
@click.option(
    "--lora-alpha",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="LoRA: the scale alpha (updates are scaled by alpha / rank).",
)
@click.option(
    "--dropout",
    type=click.FloatRange(min=0, max=1, max_open=True),
    help="Set every dropout layer's probability (default: the model's own). Dropout draws "
    "random masks in each stage process, so only a run without it repeats one process's "
    "losses exactly.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="Checkpoint the trainable and optimiser state every N steps (0: never); RUN is then "
    "written in place, so a run whose stage dies can be resumed.",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Continue the run in this directory from its last checkpoint (no MODEL, no -t).",
)
@click.option(
    "--without",
    metavar="DEVICE,...",
    help="With --resume: these devices are gone; plan the rest of the run anew over the "
    "run's topology without them.",
)
@click.option(
    "--data-parallel",
    "data_parallel",
    is_flag=True,
    help="Run data parallelism instead of the pipeline: every device a replica of the "
    "whole model with a share of each step's micro-batches by its speed, gradients "
    "all-reduced (the plan's `data parallel` row; refused where it does not fit).",
)
@click.option(
    "--replicate",
    type=click.Choice(["auto", "off"]),
    default="auto",
    show_default=True,
    help="auto: a stage may run on a group of devices (each a share of the micro-batches, "
    "gradients all-reduced in the group) where that beats every chain and data "
    "parallelism; off: chains only.",
)
@click.option(
    "--hosts",
    "hosts_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Run across hosts: the hosts file lists one HOST:PORT a stage (as for serving); "
    "stage 0 runs here, each other stage K joins from its host with `lamc train --join "
    "hosts.yaml --stage K`. Inside a trusted network: gloo does not encrypt.",
)
@click.option(
    "--join",
    "join_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Join a run launched with --hosts on another host, as stage --stage K.",
)
@click.option(
    "--stage", "join_stage", type=click.IntRange(min=1), help="With --join: this host's stage."
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan (or each step) as JSON.")
@model_options
@lamc_command("train")
def train_command(
    model: str,
    topology_path: Path,
    method: str,
    micro_batches: int,
    schedule: str,
    optimiser: str,
    lora_rank: int,
    lora_targets: str | None,
    prompt_tokens: int,
    dry_run: bool,
    compare: bool,
    data: Path | None,
    run_dir: Path | None,
    steps: int,
    lr: float,
    seed: int,
    clip: float,
    lora_alpha: int,
    dropout: float | None,
    checkpoint_every: int,
    resume_dir: Path | None,
    without: str | None,
    data_parallel: bool,
    replicate: str,
    hosts_file: Path | None,
    join_file: Path | None,
    join_stage: int | None,
    as_json: bool,
    **options: Any,
) -> str:
    """Plan fine-tuning MODEL over the devices of a topology, and run it with --data and
    -o. The micro-batch's shape is the analysed one (`--dims batch=4,seq=128`)."""
    if join_file is not None:
        if model is not None or topology_path is not None or join_stage is None:
            raise UsageError(
                "--join HOSTS --stage K takes no MODEL and no -t: the run comes from stage 0"
            )
        require_compile_extra()
        from lamc.cli.train_run import join_run

        return join_run(join_file, join_stage, run_dir)
    if join_stage is not None:
        raise UsageError("--stage K applies to --join HOSTS")
    if resume_dir is not None:
        if model is not None or topology_path is not None or dry_run:
            raise UsageError(
                "--resume RUN continues the run as it was planned: give no MODEL, -t or --dry-run"
            )
        require_compile_extra()
        from lamc.cli.train_run import resume_run
        from lamc.runtime.loading import devices

        return resume_run(resume_dir, as_json, without=devices(without), hosts_file=hosts_file)
    if without is not None:
        raise UsageError("--without DEVICE applies to --resume RUN")
    if model is None or topology_path is None:
        raise UsageError("give MODEL and -t TOPOLOGY (or --resume RUN)")
    if options.get("adapter") is not None:
        raise UsageError(
            "lamc train starts from MODEL as it is; --adapter applies a result to compile it"
        )
    if not dry_run and (data is None or run_dir is None):
        raise UsageError("a training run needs --data DATA.npz and -o RUN (or --dry-run)")
    require_compile_extra()
    from lamc.compiler.training import plan_training
    from lamc.topology import load_topology

    dataset = None
    if data is not None and not dry_run:
        from lamc.training.job import load_data

        # Refused now, before any process starts; and a classifier's data names its
        # classes: the model is analysed with that head.
        dataset = load_data(str(data), model)
        if dataset.labels is not None:
            options["labels"] = len(dataset.label_names)
    topology = load_topology(topology_path)
    # What planning takes besides the model: kept in a resumable run (replan.json).
    training = {
        "method": method,
        "micro_batches": micro_batches,
        "schedule": schedule,
        "optimiser": optimiser,
        "lora_rank": lora_rank,
        "lora_targets": [t.strip() for t in (lora_targets or "").split(",") if t.strip()],
        "prompt_tokens": prompt_tokens,
    }
    spec = _training_options(training).spec
    analysed = analyse_model(model, options)
    plan = plan_training(
        analysed,
        topology,
        _training_options(training),
        compare=compare,
        replicate=replicate == "auto" and not data_parallel,
    )
    planned = _plan_data(plan)
    if dry_run and as_json:
        click.echo(json.dumps(_finite(planned), indent=2, sort_keys=True))
    elif not (as_json and not dry_run):
        _render(planned)
    if plan.solution is None:
        raise CommandOutcome(
            int(ExitCode.NO_FIT),
            f"{model} on {topology.name}: no pipeline holds the {method} training state "
            f"({spec.micro_batches} micro-batches, {spec.schedule})",
        )
    summary = (
        f"{model} {method} on {topology.name}: {len(plan.solution.segments)} stage(s), "
        f"step {plan.solution.step_ms:.1f} ms, {planned['samples_per_s']:.1f} samples/s"
    )
    if data_parallel:
        planned = _data_parallel_plan(plan, planned, f"{model} on {topology.name}")
    elif plan.hybrid is not None:
        planned = _hybrid_plan(plan, planned)
        summary = (
            f"{model} {method} on {topology.name}: {len(plan.hybrid.stages)} stage(s) on "
            f"{len(planned['stages'])} devices (replicated), step {plan.hybrid.step_ms:.1f} ms, "
            f"{planned['samples_per_s']:.1f} samples/s"
        )
    if not dry_run:
        assert data is not None and run_dir is not None
        from lamc.cli.train_run import RunSettings, run_plan

        settings = RunSettings(
            steps, lr, seed, clip, lora_alpha, checkpoint_every, dropout,
            hosts=training_hosts(hosts_file, len(planned["stages"])),
        )  # fmt: skip
        # What planning took, so that --resume --without can plan the rest anew.
        replan = {
            "topology": topology_path.read_text(),
            "training": training,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        }
        return run_plan(
            model, plan, analysed, _finite(planned), data, dataset, run_dir, settings, as_json,
            replan,
        )  # fmt: skip
    if plan.replicated is not None:  # the pipelines are all in the search; this is not
        summary += (
            f"; data parallelism is faster: {plan.replicated.step_ms:.1f} ms per step "
            f"({plan.replicated.description})"
        )
    return summary


def training_hosts(path: Path | None, processes: int) -> tuple[str, int] | None:
    """Stage 0's HOST and PORT from a hosts file that lists one host a process of the run."""
    if path is None:
        return None
    from lamc.runtime.hosts import load_hosts

    endpoints = load_hosts(path)
    if len(endpoints.stages) != processes:
        raise UsageError(
            f"{path} lists {len(endpoints.stages)} host(s); the run has {processes} "
            "process(es), one a stage (or a stage's member, or a replica)",
            hint="list one HOST:PORT for each, in the plan's order",
        )
    if endpoints.tls is not None:
        raise UsageError(
            f"{path}: tls: training runs on gloo, which does not encrypt",
            hint="run inside a trusted network (or a VPN between the hosts) with a hosts "
            "file without tls:",
        )
    host, _, port = endpoints.stages[0].rpartition(":")
    return host.strip("[]"), int(port)


def _hybrid_plan(plan: Any, planned: dict[str, Any]) -> dict[str, Any]:
    """The plan summary of a run with replicated stages: one entry a process (a stage's
    member, with its micro-batches and memory: the whole stage and its share's
    activations)."""
    found, cost = plan.hybrid, plan.cost
    names = [d.name for d in cost.devices]
    units = cost.inference.workload.units
    stages = []
    for position, group in enumerate(found.stages):
        for device, share in zip(group.members, group.shares):
            memory = cost.memory(device, group.start, group.end, 1)
            kept = float(cost.saved[group.start, group.end]) * share
            stages.append(
                {
                    "stage": position,
                    "device": names[device],
                    "units": [units[group.start].name, units[group.end - 1].name],
                    "start_unit": group.start,
                    "end_unit": group.end,
                    "micro_batches": share,
                    "memory_bytes": {
                        "total": memory.total - memory.activations + kept,
                        "capacity": memory.capacity,
                    },
                }
            )
    return {
        **planned,
        "choice": "replicated stages",
        "step_ms": found.step_ms,
        "bottleneck_ms": found.bottleneck_ms,
        "samples_per_s": plan.samples_per_s(found.step_ms),
        "stage_groups": [list(g.shares) for g in found.stages],
        "stage_starts": [g.start for g in found.stages],
        "stages": stages,
    }


def _data_parallel_plan(plan: Any, planned: dict[str, Any], what: str) -> dict[str, Any]:
    """The plan summary of the data-parallel run `--data-parallel` asks for: its predicted
    step and each replica's memory; exit 6 where the whole training state does not fit."""
    from lamc.passes.partition.training_baselines import data_parallel

    replicas = data_parallel(plan.cost, plan.problem)
    if not replicas.segments:
        raise CommandOutcome(
            int(ExitCode.NO_FIT), f"{what}: no data-parallel run: {replicas.reason}"
        )
    names = [d.name for d in plan.cost.devices]
    n = plan.cost.n
    return {
        **planned,
        "choice": "data parallel",
        "step_ms": replicas.step_ms,
        "replicas": list(replicas.shares),
        "stages": [
            {
                "device": names[s.device],
                "start_unit": 0,
                "end_unit": n,
                "memory_bytes": {"total": plan.cost.memory(s.device, 0, n, 1).total},
            }
            for s in replicas.segments
        ],
    }


def replan_training(model: str, replan: dict[str, Any], gone: tuple[str, ...]) -> Any:
    """The plan of a run's model over its topology without the devices `gone` (for
    `--resume --without`)."""
    from lamc.compiler.training import plan_training
    from lamc.topology import load_topology

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "topology.yaml"
        path.write_text(replan["topology"])
        topology = load_topology(path)
    names = {d.name for d in topology.devices}
    unknown = sorted(set(gone) - names)
    if unknown:
        raise UsageError(
            f"--without {', '.join(unknown)}: not a device of {topology.name}",
            hint=f"its devices: {', '.join(sorted(names))}",
        )
    if set(gone) >= names:
        raise UsageError("--without names every device of the run's topology")
    training = replan["training"]
    options = dict(replan["options"])
    if options.get("dump_ir") is not None:
        options["dump_ir"] = Path(options["dump_ir"])
    analysed = analyse_model(model, options)
    plan = plan_training(
        analysed, topology.without(set(gone)), _training_options(training), replicate=False
    )
    if plan.solution is None:
        raise CommandOutcome(
            int(ExitCode.NO_FIT),
            f"{model}: without {', '.join(gone)}, no pipeline holds the training state",
        )
    return plan, analysed, _finite(_plan_data(plan))


def _training_options(training: dict[str, Any]) -> Any:
    """The planner's options from the command's (or a run's replan.json) training settings."""
    from lamc.compiler.training import TrainingOptions
    from lamc.training_cost import TrainingSpec

    spec = TrainingSpec(
        training["method"], training["micro_batches"], training["schedule"], training["optimiser"]
    )
    return TrainingOptions(
        spec, training["lora_rank"], tuple(training["lora_targets"]), training["prompt_tokens"]
    )


def _plan_data(plan: Any) -> dict[str, Any]:
    cost, solution = plan.cost, plan.solution
    names = [d.name for d in cost.devices]
    units = cost.inference.workload.units
    stages = []
    if solution is not None:
        for position, seg in enumerate(solution.segments):
            memory = cost.memory(seg.device, seg.start, seg.end, len(solution.segments) - position)
            stages.append(
                {
                    "device": names[seg.device],
                    "units": [units[seg.start].name, units[seg.end - 1].name],
                    "forward_ms": float(cost.forward_ms[seg.device, seg.start : seg.end].sum()),
                    "backward_ms": float(cost.backward_ms[seg.device, seg.start : seg.end].sum()),
                    "micro_batches_kept": cost.in_flight(len(solution.segments) - position),
                    "memory_bytes": {
                        "frozen": memory.frozen,
                        "trainable": memory.trainable,
                        "gradients": memory.gradients,
                        "optimiser": memory.optimiser,
                        "activations": memory.activations,
                        "runtime": memory.runtime,
                        "total": memory.total,
                        "capacity": memory.capacity,
                    },
                }
            )
    step = solution.step_ms if solution is not None else math.inf
    return {
        "method": cost.spec.method,
        "schedule": cost.spec.schedule,
        "micro_batches": cost.spec.micro_batches,
        "trainable_params": plan.trainable_params,
        "lora_targets": list(plan.targets),
        "stages": stages,
        "step_ms": step,
        "bottleneck_ms": solution.bottleneck_ms if solution is not None else math.inf,
        "samples_per_s": plan.samples_per_s(step),
        "bottleneck_candidates": solution.candidates if solution is not None else 0,
        "choice": (
            "replicated stages"
            if plan.hybrid is not None
            else "pipeline"
            if plan.replicated is None
            else "data parallel"
        ),
        "data_parallel_step_ms": plan.replicated.step_ms if plan.replicated else None,
        "replicated_stages": _hybrid_data(plan),
        "notes": [plan.hybrid_note] if plan.hybrid_note else [],
        "compare": [
            {
                "name": b.name,
                "description": b.description,
                "step_ms": b.step_ms,
                "samples_per_s": plan.samples_per_s(b.step_ms),
                "vs_lamc": (b.step_ms / step) if math.isfinite(step) else None,
                "reason": b.reason,
            }
            for b in plan.baselines
        ],
    }


def _hybrid_data(plan: Any) -> dict[str, Any] | None:
    """The faster plan with replicated stages, when there is one."""
    found = plan.hybrid
    if found is None:
        return None
    names = [d.name for d in plan.cost.devices]
    units = plan.cost.inference.workload.units
    return {
        "step_ms": found.step_ms,
        "samples_per_s": plan.samples_per_s(found.step_ms),
        "all_reduce_ms": found.reduce_ms,
        "stages": [
            {
                "devices": [names[e] for e in s.members],
                "micro_batches": list(s.shares),
                "units": [units[s.start].name, units[s.end - 1].name],
            }
            for s in found.stages
        ],
    }


def _finite(value: Any) -> Any:
    """JSON has no infinity: a plan that does not fit says null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _render(data: dict[str, Any]) -> None:
    from lamc.cli.tables import Table
    from lamc.cli.ui import stdout_console

    console = stdout_console()
    table = Table(
        title=f"{data['method']} training, {data['micro_batches']} micro-batches, "
        f"{data['schedule']}: {data['trainable_params']:,} trainable parameters"
    )
    for column in ("stage", "device", "units", "fwd ms", "bwd ms", "kept", "memory", "of"):
        table.add_column(column, justify="right" if column not in ("device", "units") else "left")
    for k, stage in enumerate(data["stages"]):
        memory = stage["memory_bytes"]
        table.add_row(
            str(k),
            stage["device"],
            " .. ".join(dict.fromkeys(stage["units"])),
            f"{stage['forward_ms']:.2f}",
            f"{stage['backward_ms']:.2f}",
            str(stage["micro_batches_kept"]),
            f"{memory['total'] / 2**20:.1f} MiB",
            f"{memory['capacity'] / 2**30:.1f} GiB",
        )
    console.print(table)
    console.print(
        f"step {data['step_ms']:.2f} ms (bottleneck {data['bottleneck_ms']:.2f} ms), "
        f"{data['samples_per_s']:.1f} samples/s"
    )
    if data["choice"] == "data parallel":
        console.print(
            f"data parallelism over every device beats every pipeline: "
            f"{data['data_parallel_step_ms']:.2f} ms per step"
        )
    hybrid = data.get("replicated_stages")
    if hybrid:
        stages = "; ".join(
            f"{'+'.join(s['devices'])} [{' .. '.join(dict.fromkeys(s['units']))}]"
            + (
                f" micro-batches {'/'.join(str(k) for k in s['micro_batches'])}"
                if len(s["devices"]) > 1
                else ""
            )
            for s in hybrid["stages"]
        )
        console.print(
            f"replicated stages beat every chain and data parallelism: "
            f"{hybrid['step_ms']:.2f} ms per step ({hybrid['samples_per_s']:.1f} samples/s; "
            f"all-reduce {hybrid['all_reduce_ms']:.2f} ms): {stages}. A run takes them "
            "(--replicate off: the chain above)"
        )
    for note in data.get("notes", ()):
        console.print(note)
    if data["compare"]:
        compare = Table(title="against")
        for column in ("plan", "how", "step ms", "samples/s", "vs lamc"):
            compare.add_column(column)
        for row in data["compare"]:
            fits = math.isfinite(row["step_ms"])
            compare.add_row(
                row["name"],
                row["description"] if fits else f"does not fit: {row['reason']}",
                f"{row['step_ms']:.2f}" if fits else "-",
                f"{row['samples_per_s']:.1f}" if fits else "-",
                f"{row['vs_lamc']:.2f}x" if fits and row["vs_lamc"] else "-",
            )
        console.print(compare)

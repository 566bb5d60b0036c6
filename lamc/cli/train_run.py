"""`lamc train ... --data D.npz -o RUN`: run the plan, one stage process per stage on this
machine, and write RUN atomically (run.json, and the adapter or the full weights)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click


def run_plan(
    model: str,
    plan: Any,
    analysed: Any,
    planned: dict[str, Any],
    data: Path,
    run_dir: Path,
    steps: int,
    lr: float,
    seed: int,
    clip: float,
    lora_alpha: int,
    as_json: bool,
) -> str:
    from lamc.atomic import atomic_directory
    from lamc.training.job import Job, check_source, load_tokens
    from lamc.training.launch import gather, run_local

    load_tokens(str(data))  # refused now, before any process starts
    solution = plan.solution
    units = analysed.workload.units
    check_source(model)  # before any process starts
    spec = plan.cost.spec
    devices = tuple(plan.cost.devices[s.device].name for s in solution.segments)
    job = Job(
        model=model,
        method=spec.method,
        data=str(data.resolve()),
        split_points=tuple(units[s.start].name.split("+")[0] for s in solution.segments[1:]),
        devices=devices,
        micro_batches=spec.micro_batches,
        micro_batch_size=int(analysed.workload.binding.get("batch", 1)),
        steps=steps,
        lr=lr,
        optimizer=spec.optimiser,
        schedule=spec.schedule,
        seed=seed,
        clip=clip,
        lora_rank=plan.lora_rank,  # the plan's sizes are the run's
        lora_alpha=lora_alpha,
        lora_targets=plan.targets,
    )

    def progress(record: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(record, sort_keys=True))
        else:
            click.echo(
                f"step {record['step'] + 1}/{steps}  loss {record['loss']:.4f}  "
                f"{record['step_ms']:.0f} ms (predicted {solution.step_ms:.0f} ms)  "
                f"{record['samples'] * 1000 / record['step_ms']:.1f} samples/s"
            )

    with atomic_directory(run_dir, owner_file="run.json") as tmp:
        records = run_local(job, tmp, progress=progress)
        result = gather(job, tmp)
        for leftover in tmp.glob("stage-*.safetensors"):
            leftover.unlink()
        # The first step also traces and builds the stages: the median of the rest.
        measured = statistics.median(r["step_ms"] for r in records[1:] or records)
        summary = {
            "job": json.loads((tmp / "job.json").read_text()),
            "plan": planned,
            "steps": records,
            "measured_step_ms": measured,
            "predicted_step_ms": solution.step_ms,
            "result": result.name,
        }
        (tmp / "run.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return (
        f"{model} {spec.method} -> {run_dir}/{result.name}: {steps} steps on "
        f"{len(devices)} stage process(es), loss {records[0]['loss']:.4f} -> "
        f"{records[-1]['loss']:.4f}, step {measured:.0f} ms (predicted {solution.step_ms:.0f} ms)"
    )

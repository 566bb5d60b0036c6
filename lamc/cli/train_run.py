"""`lamc train ... --data D.npz -o RUN`: run the plan, one stage process per stage on this
machine, and write RUN (run.json, and the adapter or the full weights).

Without `--checkpoint-every`, RUN is written atomically: it appears whole or not at all.
With it, RUN is the run's working directory from the start (job.json, plan.json,
steps.jsonl, checkpoints/): a run whose stage dies stays there, and
`lamc train --resume RUN` continues it from its last checkpoint. run.json, written last,
marks a finished run."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from lamc.atomic import replace_file
from lamc.errors import LamcError, UsageError


@dataclass(frozen=True)
class RunSettings:
    """How the run trains, beside the plan: the command's run options."""

    steps: int = 20
    lr: float = 1e-3
    seed: int = 0
    clip: float = 0.0
    lora_alpha: int = 16
    checkpoint_every: int = 0
    dropout: float | None = None
    hosts: tuple[str, int] | None = None  # --hosts: stage 0's HOST and PORT


def run_plan(
    model: str,
    plan: Any,
    analysed: Any,
    planned: dict[str, Any],
    data: Path,
    dataset: Any,
    run_dir: Path,
    settings: RunSettings,
    as_json: bool,
    replan: dict[str, Any] | None = None,
) -> str:
    """`dataset`: `data` as loaded (and checked) by the command, before any process starts."""
    from lamc.atomic import atomic_directory
    from lamc.training.job import Job, check_source, user_loss

    check_source(model)
    # A factory's ModelSpec may name the loss (`loss(outputs, target)`): the task is then its.
    task = "custom" if user_loss(model) is not None else dataset.task
    spec = plan.cost.spec
    replicas = tuple(planned.get("replicas", ()))  # --data-parallel
    groups = tuple(tuple(g) for g in planned.get("stage_groups", ()))  # replicated stages
    units = analysed.workload.units
    if replicas:
        cuts: tuple[str, ...] = ()
    elif groups:
        cuts = tuple(units[k].name.split("+")[0] for k in planned["stage_starts"][1:])
    else:
        cuts = split_points(plan.solution.segments, analysed)
    job = Job(
        model=model,
        method=spec.method,
        data=str(data.resolve()),
        split_points=cuts,
        devices=(
            tuple(s["device"] for s in planned["stages"])
            if replicas or groups
            else plan_devices(plan)
        ),
        replicas=replicas,
        stage_groups=groups,
        micro_batches=spec.micro_batches,
        micro_batch_size=int(analysed.workload.binding.get("batch", 1)),
        steps=settings.steps,
        lr=settings.lr,
        optimizer=spec.optimiser,
        schedule=spec.schedule,
        seed=settings.seed,
        clip=settings.clip,
        lora_rank=plan.lora_rank,  # the plan's sizes are the run's
        lora_alpha=settings.lora_alpha,
        lora_targets=plan.targets,
        prompt_tokens=plan.prompt_tokens,
        task=task,
        labels=len(dataset.label_names) if dataset.labels is not None else 0,
        checkpoint_every=settings.checkpoint_every,
        dropout=settings.dropout,
        extra={"label_names": list(dataset.label_names)} if dataset.labels is not None else {},
    )
    plan_text = json.dumps(planned, indent=2, sort_keys=True) + "\n"
    if job.checkpoint_every:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise UsageError(
                f"{run_dir} exists and is not empty",
                hint=f"continue a run there with lamc train --resume {run_dir}, or choose another -o",
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "plan.json").write_text(plan_text)
        if replan is not None:
            (run_dir / "replan.json").write_text(json.dumps(replan, indent=2) + "\n")
        return _execute(job, run_dir, planned, as_json, shown=run_dir, hosts=settings.hosts)
    with atomic_directory(run_dir, owner_file="run.json") as tmp:
        (tmp / "plan.json").write_text(plan_text)
        return _execute(job, tmp, planned, as_json, shown=run_dir, hosts=settings.hosts)


def _processes(job: Any) -> str:
    if job.replicas:
        return f"{len(job.devices)} replica process(es)"
    if job.stage_groups:
        return f"{job.stages} stage(s) on {job.processes} processes (replicated)"
    return f"{len(job.devices)} stage process(es)"


def split_points(segments: Any, analysed: Any) -> tuple[str, ...]:
    """The module paths where a pipeline's stages 1.. begin."""
    units = analysed.workload.units
    return tuple(units[s.start].name.split("+")[0] for s in segments[1:])


def plan_devices(plan: Any) -> tuple[str, ...]:
    return tuple(plan.cost.devices[s.device].name for s in plan.solution.segments)


def resume_run(
    run_dir: Path,
    as_json: bool,
    without: tuple[str, ...] = (),
    hosts_file: Path | None = None,
) -> str:
    """Continue the run in `run_dir` from its newest complete checkpoint; `without`: on a
    plan made anew without these devices (the checkpoint names weights by the module's
    own names, so it loads on any split); `hosts_file`: across hosts again (the others
    join with `lamc train --join`, and receive the checkpoint from here)."""
    from lamc.training import checkpoint
    from lamc.training.job import Job

    if not (run_dir / "job.json").is_file() or not (run_dir / "plan.json").is_file():
        raise UsageError(f"--resume {run_dir}: not a lamc train run (no job.json and plan.json)")
    if (run_dir / "run.json").is_file():
        raise UsageError(f"--resume {run_dir}: the run has finished (it has run.json)")
    try:
        job = Job.read(run_dir / "job.json")
        planned = json.loads((run_dir / "plan.json").read_text())
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"--resume {run_dir}: job.json or plan.json is damaged ({exc})") from None
    start = checkpoint.latest(run_dir) or 0
    if without and job.replicas:
        raise UsageError(
            f"--resume {run_dir} --without: a data-parallel run resumes on its own replicas",
            hint="resume it without --without",
        )
    if without:
        from lamc.cli.train_cmd import replan_training

        if not (run_dir / "replan.json").is_file():
            raise UsageError(f"--resume {run_dir}: the run kept no replan.json to plan anew from")
        replan = json.loads((run_dir / "replan.json").read_text())
        plan, analysed, planned = replan_training(job.model, replan, without)
        job = dataclasses.replace(
            job,
            split_points=split_points(plan.solution.segments, analysed),
            devices=plan_devices(plan),
            stage_groups=(),  # the chain made anew
        )
        (run_dir / "plan.json").write_text(json.dumps(planned, indent=2, sort_keys=True) + "\n")
        job.write(run_dir / "job.json")
    if not as_json:
        stages = ", ".join(job.devices)
        click.echo(
            f"resuming {job.model} {job.method} at step {start + 1} of {job.steps} on {stages}"
        )
    from lamc.cli.train_cmd import training_hosts

    hosts = training_hosts(hosts_file, job.processes)
    return _execute(
        dataclasses.replace(job, start_step=start),
        run_dir,
        planned,
        as_json,
        shown=run_dir,
        hosts=hosts,
    )


def join_run(hosts_file: Path, stage: int, work: Path | None) -> str:
    """`lamc train --join HOSTS --stage K`: this host's stage of a run launched on stage 0's
    host with --hosts. The job and the data come from there; the trained weights go back."""
    import os
    import subprocess
    import sys
    import tempfile

    from lamc.errors import RuntimeEnvironmentError
    from lamc.runtime.hosts import load_hosts

    endpoints = load_hosts(hosts_file)
    if stage >= len(endpoints.stages):
        raise UsageError(
            f"--stage {stage}: {hosts_file} lists stages 0..{len(endpoints.stages) - 1}"
        )
    host, _, port = endpoints.stages[0].rpartition(":")
    env = {
        **os.environ,
        "MASTER_ADDR": host.strip("[]"),
        "MASTER_PORT": port,
        "WORLD_SIZE": str(len(endpoints.stages)),
        "RANK": str(stage),
        "LAMC_TRAIN_HOSTS": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    with tempfile.TemporaryDirectory(prefix=f"lamc-train-stage{stage}-") as scratch:
        where = work or Path(scratch)
        code = subprocess.call([sys.executable, "-m", "lamc.training.worker", str(where)], env=env)
    if code != 0:
        raise RuntimeEnvironmentError(
            f"stage {stage} of the run at {endpoints.stages[0]} exited with {code}"
        )
    return f"stage {stage} of the run at {endpoints.stages[0]}: done, its weights handed to stage 0"


def _execute(
    job: Any,
    where: Path,
    planned: dict[str, Any],
    as_json: bool,
    shown: Path,
    hosts: tuple[str, int] | None = None,
) -> str:
    from lamc.training import checkpoint
    from lamc.training.launch import STEPS, gather, read_steps, run_local

    predicted = float(planned["step_ms"])

    def progress(record: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(record, sort_keys=True))
        else:
            click.echo(
                f"step {record['step'] + 1}/{job.steps}  loss {record['loss']:.4f}  "
                f"{record['step_ms']:.0f} ms (predicted {predicted:.0f} ms)  "
                f"{record['samples'] * 1000 / record['step_ms']:.1f} samples/s"
            )

    try:
        run_local(job, where, progress=progress, hosts=hosts)
    except LamcError as exc:
        saved = checkpoint.latest(where) if job.checkpoint_every else None
        if saved is not None:
            exc.hint = f"continue from step {saved + 1}: lamc train --resume {shown}"
        raise
    result = gather(job, where)
    for leftover in where.glob("stage-*.safetensors"):
        leftover.unlink()
    shutil.rmtree(where / checkpoint.CHECKPOINTS, ignore_errors=True)
    records = read_steps(where / STEPS)
    # Each stage's peak resident memory against the plan's prediction for it.
    memory = []
    for k, stage in enumerate(planned["stages"]):
        report = where / f"stage-{k}.json"
        peak = json.loads(report.read_text())["peak_rss_bytes"] if report.is_file() else None
        memory.append(
            {
                "device": stage["device"],
                "predicted_bytes": stage["memory_bytes"]["total"],
                "peak_rss_bytes": peak,
            }
        )
        report.unlink(missing_ok=True)
    # The first step of each launch also traces and builds the stages: the median of the rest.
    timed = [r for r in records if r["step"] not in (0, job.start_step)] or records
    measured = statistics.median(r["step_ms"] for r in timed)
    summary = {
        "job": json.loads((where / "job.json").read_text()),
        "plan": planned,
        "steps": records,
        "measured_step_ms": measured,
        "predicted_step_ms": predicted,
        "memory": memory,
        "result": result.name,
    }
    if not as_json:
        for k, entry in enumerate(memory):
            if entry["peak_rss_bytes"]:
                click.echo(
                    f"{'replica' if job.replicas else 'stage'} {k} on {entry['device']}: peak memory "
                    f"{entry['peak_rss_bytes'] / 2**20:.0f} MiB, planned "
                    f"{entry['predicted_bytes'] / 2**20:.0f} MiB "
                    f"({entry['peak_rss_bytes'] / entry['predicted_bytes']:.2f}x)"
                )
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    replace_file(where / "run.json", lambda path: path.write_text(text))
    return (
        f"{job.model} {job.method} -> {shown}/{result.name}: {job.steps} steps on "
        f"{_processes(job)}, loss {records[0]['loss']:.4f} -> "
        f"{records[-1]['loss']:.4f}, step {measured:.0f} ms (predicted {predicted:.0f} ms)"
    )

"""Launching a training run on this machine: one `lamc.training.worker` process per stage,
torch.distributed over gloo on loopback. The last stage's JSON lines are the progress; a
stage that dies fails the run naming it and its device. The stages' trainable weights are
gathered into RUN/ at the end (peft's adapter format for LoRA, safetensors for full)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lamc.errors import RuntimeEnvironmentError
from lamc.training.job import Job, build_module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_local(
    job: Job,
    run_dir: Path,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 3600.0,
    prefix: Mapping[int, Sequence[str]] | None = None,
    master_addr: str = "127.0.0.1",
    extra_env: Mapping[str, str] | None = None,
    hosts: tuple[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Run `job` with one process per stage here; returns the last stage's step records.
    `prefix[k]`: a command stage k's process runs under (a cgroup, a network namespace:
    how the benchmarks emulate devices); `master_addr`: where the others reach stage 0
    (its namespace's address); `extra_env`: more environment for every stage (gloo's
    interface). `hosts`: stage 0's HOST and PORT, where the other stages join from their
    own hosts (`lamc train --join`); only stage 0 runs here, and reports every step."""
    world = job.processes
    run_dir.mkdir(parents=True, exist_ok=True)
    job.write(run_dir / "job.json")
    if not job.replicas:  # each stage loads only its own weights
        from lamc.training.worker import write_slices

        write_slices(job, run_dir)
    env = {
        **os.environ,
        **(extra_env or {}),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    if hosts is not None:
        env.update(MASTER_ADDR=hosts[0], MASTER_PORT=str(hosts[1]), LAMC_TRAIN_HOSTS="1")
    local = [0] if hosts is not None else list(range(world))
    processes = []
    logs = []
    for rank in local:
        log = (run_dir / f"stage-{rank}.log").open("w")
        logs.append(log)
        processes.append(
            subprocess.Popen(
                [
                    *(prefix or {}).get(rank, ()),
                    sys.executable,
                    "-m",
                    "lamc.training.worker",
                    str(run_dir),
                ],
                env={**env, "RANK": str(rank)},
                stdout=subprocess.PIPE if rank == local[-1] else log,
                stderr=log,
                text=True,
            )
        )
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    last = processes[-1]
    assert last.stdout is not None
    log_steps = _StepLog(run_dir / STEPS, job.start_step)

    def record(line: dict[str, Any]) -> None:
        log_steps.append(line)
        if progress is not None:
            progress(line)

    reader = threading.Thread(target=_read_lines, args=(last.stdout, records, record))
    reader.start()
    try:
        # A stage that dies leaves the others blocked in a collective: watch them all,
        # and end the run at the first failure, naming the stage and its device.
        while any(p.poll() is None for p in processes):
            for rank, process in zip(local, processes):
                code = process.poll()
                if code not in (None, 0):
                    raise RuntimeEnvironmentError(
                        f"{_what(job)} {rank} on {job.devices[rank]} exited with {code}: "
                        f"{_tail(run_dir / f'stage-{rank}.log')}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeEnvironmentError(f"the run took longer than {timeout_s:.0f} s")
            time.sleep(0.1)
        for rank, process in zip(local, processes):
            if process.returncode != 0:
                raise RuntimeEnvironmentError(
                    f"{_what(job)} {rank} on {job.devices[rank]} exited with "
                    f"{process.returncode}: {_tail(run_dir / f'stage-{rank}.log')}"
                )
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        reader.join(timeout=10)
        for log in logs:
            log.close()
    if len(records) != job.steps - job.start_step:
        raise RuntimeEnvironmentError(
            f"the last stage reported {len(records)} of {job.steps - job.start_step} steps"
        )
    return records


def _what(job: Job) -> str:
    return "replica" if job.replicas else "stage"


STEPS = "steps.jsonl"


class _StepLog:
    """RUN/steps.jsonl: every step's record as it is reported. A resumed run first drops
    the records of the steps it runs again (those after its checkpoint)."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        kept = [r for r in read_steps(path) if r["step"] < start_step]
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The step records in `path` (none if it is missing)."""
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


def gather(job: Job, run_dir: Path) -> Path:
    """The stages' trainable weights, as one result: RUN/adapter (peft) or RUN/model.safetensors."""
    from safetensors.torch import load_file, save_file

    world = 1 if job.replicas else len(job.split_points) + 1  # replica 0 saves for all
    module = build_module(job)
    # A tied weight is saved by whichever stage owned it, under the name that stage
    # knew it by: one name per weight, the module's own.
    canonical = {
        alias: name
        for name, parameter in module.named_parameters()
        for alias, other in module.named_parameters(remove_duplicate=False)
        if other is parameter
    }
    state: dict[str, Any] = {}
    for rank in range(world):
        for name, tensor in load_file(str(run_dir / f"stage-{rank}.safetensors")).items():
            state[canonical.get(name, name)] = tensor
    if job.method == "full":
        path = run_dir / "model.safetensors"
        save_file(state, str(path))
        _write_task(job, run_dir)
        return path
    missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise RuntimeEnvironmentError(f"no stage saved {', '.join(missing[:5])}")
    module.load_state_dict(state, strict=False)
    path = run_dir / "adapter"
    if job.method == "prompt":
        from lamc.frontend.prompt import save_prompt_tuned

        save_prompt_tuned(module, path)
    else:
        module.save_pretrained(str(path))
    _write_task(job, path)
    return path


def _write_task(job: Job, where: Path) -> None:
    """A classifier's result says how many classes its head has, and their names, so that
    `lamc compile --adapter` gives the checkpoint the same head."""
    from lamc.frontend.adapter import TASK_FILE

    if job.task == "classify":
        task = {
            "task": "classify",
            "labels": job.labels,
            "label_names": job.extra.get("label_names", []),
        }
        (where / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n")


def _read_lines(
    stream: Any,
    records: list[dict[str, Any]],
    progress: Callable[[dict[str, Any]], None] | None,
) -> None:
    for line in stream:
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        records.append(record)
        if progress is not None:
            progress(record)


def _tail(path: Path, lines: int = 2) -> str:
    """The last lines of a stage's log (a traceback's last is the exception)."""
    try:
        text = [x.strip() for x in path.read_text().splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])[-600:] or "(empty log)"

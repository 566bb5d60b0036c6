"""One stage of a pipelined training run, or one replica of a data-parallel one:
`python -m lamc.training.worker RUN` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
set (the launcher sets them).

The launching host builds the module once (seeded), splits it at the plan's cuts and
writes each stage's weights to a slice of its own (`lamc.training.slices`). Every stage
process builds the module's skeleton on the meta device, splits it the same way with
torch.distributed.pipelining, keeps this rank's stage and loads only its slice (checked
against its sha256). Weights tied across stages (GPT-2's
embedding and output head) are copies that must stay one weight: their gradients are
summed over the stages that hold them before each update. The last stage prints one JSON
line per step (loss, step time); at the end each stage writes its trainable weights.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lamc.atomic import replace_file
from lamc.training import checkpoint, slices
from lamc.training.job import (
    Dataset,
    Job,
    build_module,
    build_skeleton,
    load_data,
    loss_of,
    make_optimizer,
    module_prefix,
    step_rows,
    takes_mask,
)


def batch_of(data: Dataset, rows: np.ndarray, with_mask: bool) -> tuple[tuple[Any, ...], Any]:
    """(the module's inputs, the loss's target) for these rows: a classifier's labels, or
    a causal LM's own ids with padding left out of the loss (-100)."""
    import torch

    part = data.take(rows)
    ids = torch.from_numpy(part.input_ids)
    mask = torch.from_numpy(part.attention_mask)
    inputs = (ids, mask) if with_mask else (ids,)
    if part.labels is not None:
        return inputs, torch.from_numpy(part.labels)
    return inputs, torch.where(mask.bool(), ids, torch.full_like(ids, -100))


def tied_groups(module: Any) -> list[list[str]]:
    """Names that share one parameter, each group sorted (deterministic on every rank)."""
    by_tensor: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(parameter), []).append(name)
    return sorted(sorted(names) for names in by_tensor.values() if len(names) > 1)


def run_stage(job: Job, run_dir: Path, rank: int, world: int, relay: Relay | None = None) -> None:
    """This rank's stage of the pipeline, in a process group already set up."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    torch.manual_seed(job.seed)
    data = load_data(job.data, job.model)
    module = build_skeleton(job)
    with_mask = takes_mask(module)
    groups = tied_groups(module)
    per_step = job.micro_batches * job.micro_batch_size
    samples = len(data.input_ids)
    pipe = split_module(job, module, data)
    del module
    slices.load_into(pipe.get_stage_module(rank), run_dir, rank)
    stage = pipe.build_stage(rank, torch.device("cpu"))
    torch.manual_seed(job.seed)  # the run's randomness (dropout) starts at the seed
    tied = tied_copies(groups, stage.submod, rank, world)
    # Counted once (gradient norm, saving): the owner's first copy of each tied weight.
    skip = {id(p) for _, copies, owner in tied for p in (copies if not owner else copies[1:])}
    named = [(n, p) for n, p in stage.submod.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    optimizer = make_optimizer(job, trainable)
    if job.start_step > 0:
        checkpoint.restore(run_dir, job.start_step, rank, named, optimizer, groups, world)
    kind = Schedule1F1B if job.schedule == "1f1b" else ScheduleGPipe
    schedule = kind(stage, job.micro_batches, loss_fn=loss_of(job.task, job.model))
    last = rank == world - 1
    for step in range(job.start_step, job.steps):
        started = time.perf_counter()
        inputs, target = batch_of(data, step_rows(step, per_step, samples), with_mask)
        optimizer.zero_grad()
        losses: list[Any] = []
        if rank == 0 and last:
            schedule.step(*inputs, target=target, losses=losses)
        elif rank == 0:
            schedule.step(*inputs)
        elif last:
            schedule.step(target=target, losses=losses)
        else:
            schedule.step()
        sum_tied(tied)
        if job.clip > 0:
            clip_norm(job.clip, trainable, skip)
        optimizer.step()
        if last:
            loss = float(torch.stack(losses).mean())
            elapsed = time.perf_counter() - started
            line = {"step": step, "loss": loss, "step_ms": elapsed * 1000, "samples": per_step}
            report(line, relay)
        elif relay is not None and rank == 0:
            relay.forward(step)
        done = step + 1
        if job.checkpoint_every and done % job.checkpoint_every == 0 and done < job.steps:
            checkpoint.save(run_dir, done, rank, named, optimizer, skip)
            if relay is not None:  # across hosts, every stage's part is kept on stage 0's
                relay.gather_checkpoint(run_dir, done, job)
            dist.barrier()
            if rank == 0:
                checkpoint.mark_complete(run_dir, done, world)
    _save(stage.submod, run_dir / f"stage-{rank}.safetensors", skip)
    (run_dir / f"stage-{rank}.json").write_text(json.dumps({"peak_rss_bytes": peak_rss()}) + "\n")


def tied_copies(
    groups: list[list[str]], stage: Any, rank: int, world: int
) -> list[tuple[Any, list[Any], bool]]:
    """For each weight tied across the module (`groups` of names) that this rank's `stage`
    holds: (the process group of every rank holding a copy, or None, this rank's copies,
    whether this rank owns it). Every rank takes part in creating every group."""
    import torch.distributed as dist

    mine = dict(stage.named_parameters(remove_duplicate=False))
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, sorted(mine))
    tied: list[tuple[Any, list[Any], bool]] = []
    for names in groups:
        holders = [r for r in range(world) if any(n in everyone[r] for n in names)]
        group = dist.new_group(holders) if len(holders) > 1 else None
        if rank in holders:
            copies = list({id(mine[n]): mine[n] for n in names if n in mine}.values())
            if group is not None or len(copies) > 1:  # a stage alone may hold two copies
                tied.append((group, copies, rank == holders[0]))
    return tied


def sum_tied(tied: list[tuple[Any, list[Any], bool]]) -> None:
    """One weight: the sum of every copy's gradient, on every copy (one collective per
    group on every holder, whichever of its copies the stage used)."""
    import torch
    import torch.distributed as dist

    for group, copies, _ in tied:
        total = sum((p.grad for p in copies if p.grad is not None), torch.zeros_like(copies[0]))
        if group is not None:
            dist.all_reduce(total, group=group)
        for parameter in copies:
            parameter.grad = total.clone()


def clip_norm(clip: float, trainable: list[Any], skip: set[int], counted: bool = True) -> None:
    """Scale every gradient so that the global norm over all processes is at most `clip`;
    `counted`: this process's gradients count in the norm (one of a stage's members)."""
    import torch
    import torch.distributed as dist

    local = (
        sum(
            float(p.grad.pow(2).sum())
            for p in trainable
            if p.grad is not None and id(p) not in skip
        )
        if counted
        else 0.0
    )
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total)
    coef = clip / (float(total.sqrt()) + 1e-6)
    if coef < 1.0:
        for p in trainable:
            if p.grad is not None:
                p.grad.mul_(coef)


def split_module(job: Job, module: Any, data: Dataset) -> Any:
    """`module` split at the job's cuts by torch.distributed.pipelining (a `Pipe`), traced
    on the first micro-batch: the same split on the launching host and in every stage."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    rows = step_rows(0, job.micro_batch_size, len(data.input_ids))
    example, _ = batch_of(data, rows, takes_mask(module))
    return pipeline(
        module,
        mb_args=example,
        split_spec={module_prefix(job) + p: SplitPoint.BEGINNING for p in job.split_points},
    )


def write_slices(job: Job, run_dir: Path) -> None:
    """On the launching host: build the module (seeded) and write each stage's slice."""
    import torch

    torch.manual_seed(job.seed)
    data = load_data(job.data, job.model)
    slices.write(split_module(job, build_module(job), data), job.stages, run_dir)


def run_replica(job: Job, run_dir: Path, rank: int, world: int, relay: Relay | None = None) -> None:
    """One replica of a data-parallel run: the whole model on its share of every step's
    micro-batches (`job.replicas[rank]`, gradients of loss / m accumulated), then one
    all-reduce of every trainable gradient over the replicas before each update: the
    same update as one process taking all m micro-batches."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(job.seed)
    data = load_data(job.data, job.model)
    module = build_module(job)
    torch.manual_seed(job.seed)  # the run's randomness (dropout) starts at the seed
    with_mask = takes_mask(module)
    loss_fn = loss_of(job.task, job.model)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    optimizer = make_optimizer(job, trainable)
    if job.start_step > 0:
        checkpoint.restore(
            run_dir, job.start_step, rank, named, optimizer, tied_groups(module), world
        )
    first, mine = sum(job.replicas[:rank]), job.replicas[rank]
    per_step = job.micro_batches * job.micro_batch_size
    samples = len(data.input_ids)
    last = rank == world - 1
    for step in range(job.start_step, job.steps):
        started = time.perf_counter()
        inputs, target = batch_of(data, step_rows(step, per_step, samples), with_mask)
        optimizer.zero_grad()
        mine_losses = accumulate(job, module, loss_fn, inputs, target, range(first, first + mine))
        summed = torch.tensor([sum(mine_losses)], dtype=torch.float64)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # every trainable gradient, summed over the replicas, at once
        offset = 0
        for parameter, grad in zip(trainable, grads):
            parameter.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()
        dist.all_reduce(summed)
        if job.clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, job.clip)
        optimizer.step()
        if last:
            elapsed = time.perf_counter() - started
            loss_mean = float(summed) / job.micro_batches
            line = {"step": step, "loss": loss_mean, "step_ms": elapsed * 1000, "samples": per_step}
            report(line, relay)
        elif relay is not None and rank == 0:
            relay.forward(step)
        done = step + 1
        if job.checkpoint_every and done % job.checkpoint_every == 0 and done < job.steps:
            if rank == 0:  # the replicas hold the same weights: one saves them
                checkpoint.save(run_dir, done, 0, named, optimizer, set())
            dist.barrier()
            if rank == 0:
                checkpoint.mark_complete(run_dir, done, 1)
    if rank == 0:
        _save(module, run_dir / "stage-0.safetensors", set())
    (run_dir / f"stage-{rank}.json").write_text(json.dumps({"peak_rss_bytes": peak_rss()}) + "\n")


def report(line: dict[str, Any], relay: Relay | None) -> None:
    """The last rank's step record: printed (the launcher reads it), and across hosts also
    handed to rank 0, whose host launched the run."""
    print(json.dumps(line), flush=True)
    if relay is not None:
        relay.put(line)


class Relay:
    """Across hosts (`lamc train --hosts`): a torch.distributed TCPStore beside the
    process group, served by rank 0 (at stage 0's port + 1). Rank 0 hands the others the
    job, the data and their stages' weight slices; the last rank hands rank 0 each step's record; at the end every rank
    hands rank 0 its trained weights and its peak memory."""

    def __init__(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        self.rank = rank
        self.store = dist.TCPStore(
            host, port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s)
        )

    def publish(self, run_dir: Path) -> None:
        job = Job.read(run_dir / "job.json")
        self.store.set("lamc/job", (run_dir / "job.json").read_bytes())  # type: ignore[arg-type]  # bytes pass as they are
        self.store.set("lamc/data", Path(job.data).read_bytes())  # type: ignore[arg-type]
        self.store.set("lamc/data-suffix", Path(job.data).suffix or ".npz")
        if job.start_step > 0:  # the checkpoint the run resumes from, for the other hosts
            folder = checkpoint.step_dir(run_dir, job.start_step)
            names = sorted(p.name for p in folder.iterdir() if p.is_file())
            self.store.set("lamc/resume", json.dumps(names))
            for name in names:
                self.store.set(f"lamc/resume/{name}", (folder / name).read_bytes())  # type: ignore[arg-type]
        if not job.replicas:  # each stage's slice, and their listing, for the other hosts
            listing = run_dir / slices.SLICES / slices.LISTING
            self.store.set("lamc/slices", listing.read_bytes())  # type: ignore[arg-type]
            for rank in range(1, job.processes):
                content = (run_dir / slices.stage_file(job.stage_of(rank))).read_bytes()
                self.store.set(f"lamc/slice/{rank}", content)  # type: ignore[arg-type]

    def fetch(self, run_dir: Path) -> Job:
        import dataclasses

        (run_dir / "job.json").write_bytes(self.store.get("lamc/job"))
        job = Job.read(run_dir / "job.json")
        suffix = self.store.get("lamc/data-suffix").decode()
        data = run_dir / f"data{suffix}"
        data.write_bytes(self.store.get("lamc/data"))
        job = dataclasses.replace(job, data=str(data))
        job.write(run_dir / "job.json")
        if job.start_step > 0:
            folder = checkpoint.step_dir(run_dir, job.start_step)
            folder.mkdir(parents=True, exist_ok=True)
            for name in json.loads(self.store.get("lamc/resume")):
                if "/" in name or name.startswith("."):
                    raise ValueError(f"checkpoint file name {name!r} from stage 0")
                (folder / name).write_bytes(self.store.get(f"lamc/resume/{name}"))
        if not job.replicas:  # checked against the listing's sha256 when loaded
            (run_dir / slices.SLICES).mkdir(exist_ok=True)
            listing = run_dir / slices.SLICES / slices.LISTING
            listing.write_bytes(self.store.get("lamc/slices"))
            slice_file = run_dir / slices.stage_file(job.stage_of(self.rank))
            slice_file.write_bytes(self.store.get(f"lamc/slice/{self.rank}"))
        return job

    def gather_checkpoint(self, run_dir: Path, step: int, job: Job) -> None:
        """Every stage's part of the checkpoint of `step` (saved by the stage's first
        process) into rank 0's run directory, where `lamc train --resume` finds it (rank 0
        then marks it complete)."""
        folder = checkpoint.step_dir(run_dir, step)
        savers: dict[int, int] = {}
        for rank in range(job.processes):
            savers.setdefault(job.stage_of(rank), rank)
        for stage, saver in savers.items():
            name = f"stage-{stage}.safetensors"
            key = f"lamc/checkpoint/{step}/{name}"
            if saver == 0:
                continue
            if self.rank == saver:
                self.store.set(key, (folder / name).read_bytes())  # type: ignore[arg-type]
            elif self.rank == 0:
                content = self.store.get(key)
                replace_file(folder / name, lambda path, c=content: path.write_bytes(c))  # type: ignore[misc]
                self.store.delete_key(key)

    def put(self, line: dict[str, Any]) -> None:
        self.store.set(f"lamc/step/{line['step']}", json.dumps(line))

    def forward(self, step: int) -> None:
        """Rank 0: print the last rank's record of `step` (for the launcher to read)."""
        print(self.store.get(f"lamc/step/{step}").decode(), flush=True)

    def ship(self, run_dir: Path, world: int) -> None:
        """Every rank's weights and memory report into rank 0's run directory."""
        names = [f"stage-{self.rank}.safetensors", f"stage-{self.rank}.json"]
        if self.rank != 0:
            for name in names:
                path = run_dir / name
                self.store.set(f"lamc/file/{name}", path.read_bytes() if path.is_file() else b"")  # type: ignore[arg-type]
            return
        for other in range(1, world):
            for name in (f"stage-{other}.safetensors", f"stage-{other}.json"):
                content = self.store.get(f"lamc/file/{name}")
                if content:
                    (run_dir / name).write_bytes(content)


def peak_rss() -> int:
    """This process's peak resident memory, in bytes: Linux's VmHWM, the high-water mark
    of this program's own memory. (`ru_maxrss` is not: it outlives exec, so a stage
    process forked from a large launcher would report the launcher's size.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _save(submod: Any, path: Path, skip: set[int]) -> None:
    from safetensors.torch import save_file

    tensors = {
        name: p.detach().contiguous().clone()
        for name, p in submod.named_parameters(remove_duplicate=False)
        if p.requires_grad and id(p) not in skip
    }
    save_file(tensors, str(path))


def accumulate(
    job: Job, module: Any, loss_fn: Any, inputs: tuple[Any, ...], target: Any, which: range
) -> list[float]:
    """Forward and backward of the step's micro-batches `which` (gradients of loss / m
    accumulated, as a pipeline's schedule does): their losses."""
    parts = [x.split(job.micro_batch_size) for x in (*inputs, target)]
    losses = []
    for i, (*micro, micro_target) in enumerate(zip(*parts, strict=True)):
        if i in which:
            loss = loss_fn(module(*micro), micro_target)
            (loss / job.micro_batches).backward()
            losses.append(float(loss.detach()))
    return losses


def run_reference(job: Job) -> tuple[list[float], dict[str, np.ndarray]]:
    """The same training in one process, without pipelining: the same module, data order,
    micro-batching (gradients of loss / m accumulated) and optimiser. The losses per step,
    and the trainable weights at the end (names as the stages save them)."""
    import torch

    torch.manual_seed(job.seed)
    data = load_data(job.data, job.model)
    module = build_module(job)
    torch.manual_seed(job.seed)  # the run's randomness (dropout) starts at the seed
    with_mask = takes_mask(module)
    loss_fn = loss_of(job.task, job.model)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(job, params)
    per_step = job.micro_batches * job.micro_batch_size
    losses = []
    for step in range(job.steps):
        inputs, target = batch_of(data, step_rows(step, per_step, len(data.input_ids)), with_mask)
        optimizer.zero_grad()
        step_losses = accumulate(job, module, loss_fn, inputs, target, range(job.micro_batches))
        if job.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, job.clip)
        optimizer.step()
        losses.append(float(np.mean(step_losses)))
    state = {n: p.detach().numpy().copy() for n, p in named}
    return losses, state


def main() -> None:
    from datetime import timedelta

    import torch.distributed as dist

    run_dir = Path(sys.argv[1])
    run_dir.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    relay = None
    # Across hosts, a peer that never joins or stops answering fails the run after 5
    # minutes (LAMC_TRAIN_TIMEOUT_S), not gloo's 30.
    across = os.environ.get("LAMC_TRAIN_HOSTS") == "1"
    default = "300" if across else "1800"
    timeout = timedelta(seconds=float(os.environ.get("LAMC_TRAIN_TIMEOUT_S", default)))
    if across:
        relay = Relay(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]) + 1,
            rank,
            world,
            timeout.total_seconds(),
        )
        if rank == 0:
            relay.publish(run_dir)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    job = (
        relay.fetch(run_dir) if relay is not None and rank != 0 else Job.read(run_dir / "job.json")
    )
    if job.replicas:
        run_replica(job, run_dir, rank, world, relay)
    elif job.stage_groups:
        from lamc.training.groups import run_group_member

        run_group_member(job, run_dir, rank, world, relay)
    else:
        run_stage(job, run_dir, rank, world, relay)
    if relay is not None:
        relay.ship(run_dir, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

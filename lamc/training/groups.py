"""Replicated stages (hybrid pipeline parallelism) at run time: a stage may run on a group
of processes, each taking its share of every step's micro-batches (`Job.stage_groups`).

torch.distributed.pipelining has one process a stage, so this runs the split module's
stages itself, on torch.distributed point-to-point messages (gloo):

- every process knows which member of each stage takes each micro-batch (the shares,
  handed out in turn by speed: `owners`);
- forward, micro-batch by micro-batch in order: a stage's inputs come from the member of
  the previous stage that ran that micro-batch (the first stage's from the data), its
  outputs go to the member of the next stage that takes it; the last stage computes the
  loss. All forwards first, then all backwards in reverse order (GPipe): a stage's output
  gradients come back from the next stage, and its input gradients go to the previous;
- each stage's trainable gradients are summed over its members (an all-reduce in the
  stage's group), a weight tied across stages over every process holding a copy; then
  each member takes the same optimiser step, so the members stay one stage.

Messages only flow forward in the forward phase and backward in the backward phase, each
receiver takes its micro-batches in the order the senders send them, and sends do not
block: no cycle can wait on itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lamc.training import checkpoint, slices
from lamc.training.job import (
    Job,
    build_skeleton,
    load_data,
    loss_of,
    make_optimizer,
    step_rows,
    takes_mask,
)

# dtypes a message between stages carries, by code.
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool", "uint8")
_MAX_TENSORS = 7
_MAX_DIMS = 6
_HEADER = 1 + _MAX_TENSORS * (3 + _MAX_DIMS)


def layout(job: Job) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """(the ranks of each stage, each rank's (stage, member))."""
    ranks: list[list[int]] = []
    where: list[tuple[int, int]] = []
    if len(job.stage_groups) != job.stages:
        raise ValueError(f"{len(job.stage_groups)} stage groups for {job.stages} stages")
    for stage, shares in enumerate(job.stage_groups):
        if sum(shares) != job.micro_batches or min(shares) < 1:
            raise ValueError(
                f"stage {stage}'s members take {'/'.join(map(str, shares))} micro-batches; "
                f"a step has {job.micro_batches}, at least one each"
            )
        ranks.append(list(range(len(where), len(where) + len(shares))))
        where += [(stage, member) for member in range(len(shares))]
    return ranks, where


def owners(shares: tuple[int, ...]) -> list[int]:
    """The member of a stage that takes each micro-batch of a step: in turn, each next one
    to the member furthest behind its share (ties to the lower member)."""
    given = [0] * len(shares)
    out = []
    for _ in range(sum(shares)):
        member = min(
            (k for k in range(len(shares)) if given[k] < shares[k]),
            key=lambda k: ((given[k] + 1) / shares[k], k),
        )
        given[member] += 1
        out.append(member)
    return out


def wiring(pipe: Any) -> list[list[tuple[str, int, int | None]]]:
    """For each stage, where each of its arguments comes from: ("input", k, None) the k-th
    input of the module, ("stage", j, i) output i of stage j (None: its only output)."""
    import operator

    graph = pipe.split_gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    stages = [n for n in graph.nodes if n.op == "call_module"]
    index = {node: k for k, node in enumerate(stages)}
    out = []
    for node in stages:
        args: list[tuple[str, int, int | None]] = []
        for arg in node.args:
            if arg in inputs:
                args.append(("input", inputs.index(arg), None))
            elif arg in index:
                args.append(("stage", index[arg], None))
            elif arg.op == "call_function" and arg.target is operator.getitem:
                source, item = arg.args
                args.append(("stage", index[source], int(item)))
            else:
                raise ValueError(f"stage argument {arg} of an unknown kind")
        out.append(args)
    return out


def _send(tensors: list[Any], to: int, tag: int, pending: list[Any]) -> None:
    import torch
    import torch.distributed as dist

    if len(tensors) > _MAX_TENSORS:
        raise ValueError(f"a stage hands on {len(tensors)} tensors; at most {_MAX_TENSORS}")
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0] = len(tensors)
    for k, tensor in enumerate(tensors):
        if tensor.dim() > _MAX_DIMS:
            raise ValueError(f"a {tensor.dim()}-dimensional tensor between stages")
        at = 1 + k * (3 + _MAX_DIMS)
        header[at] = _DTYPES.index(str(tensor.dtype).removeprefix("torch."))
        header[at + 1] = int(tensor.requires_grad)
        header[at + 2] = tensor.dim()
        header[at + 3 : at + 3 + tensor.dim()] = torch.tensor(tensor.shape)
    pending.append(dist.isend(header, to, tag=tag * 16))
    for k, tensor in enumerate(tensors):
        payload = tensor.detach().contiguous()
        if payload.dtype == torch.bool:  # gloo has no bool
            payload = payload.to(torch.uint8)
        pending.append(dist.isend(payload, to, tag=tag * 16 + 1 + k))


def _recv(source: int, tag: int) -> list[Any]:
    import torch
    import torch.distributed as dist

    header = torch.zeros(_HEADER, dtype=torch.int64)
    dist.recv(header, source, tag=tag * 16)
    out = []
    for k in range(int(header[0])):
        at = 1 + k * (3 + _MAX_DIMS)
        dtype = getattr(torch, _DTYPES[int(header[at])])
        grad = bool(header[at + 1])
        shape = [int(d) for d in header[at + 3 : at + 3 + int(header[at + 2])]]
        wire = torch.uint8 if dtype == torch.bool else dtype
        tensor = torch.empty(shape, dtype=wire)
        dist.recv(tensor, source, tag=tag * 16 + 1 + k)
        if dtype == torch.bool:
            tensor = tensor.to(torch.bool)
        out.append(tensor.requires_grad_(grad))
    return out


def run_group_member(
    job: Job, run_dir: Path, rank: int, world: int, relay: Any | None = None
) -> None:
    """This rank's member of its stage's group, in a process group already set up."""
    import torch
    import torch.distributed as dist

    from lamc.training.worker import (
        _save,
        batch_of,
        clip_norm,
        peak_rss,
        report,
        split_module,
        sum_tied,
        tied_copies,
        tied_groups,
    )

    ranks, where = layout(job)
    stage, member = where[rank]
    last_stage = len(ranks) - 1
    torch.manual_seed(job.seed)
    data = load_data(job.data, job.model)
    module = build_skeleton(job)
    with_mask = takes_mask(module)
    tied_names = tied_groups(module)
    pipe = split_module(job, module, data)
    del module
    wires = wiring(pipe)
    submod = pipe.get_stage_module(stage)
    slices.load_into(submod, run_dir, stage)
    torch.manual_seed(job.seed)  # the run's randomness (dropout) starts at the seed
    submod.train()
    who = [
        [ranks[s][k] for k in owners(tuple(shares))] for s, shares in enumerate(job.stage_groups)
    ]
    m = job.micro_batches
    mine = [mb for mb in range(m) if who[stage][mb] == rank]

    # Every process creates every group, in the same order.
    stage_groups = [dist.new_group(r) if len(r) > 1 else None for r in ranks]
    tied = tied_copies(tied_names, submod, rank, world)
    tied_ids = {id(p) for _, copies, _ in tied for p in copies}
    # Counted once in the gradient norm and when saving: member 0's, and of a tied weight
    # its first holder's first copy.
    skip = {id(p) for _, copies, owner in tied for p in (copies if not owner else copies[1:])}
    named = [(n, p) for n, p in submod.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    optimizer = make_optimizer(job, trainable)
    stages = len(ranks)
    if job.start_step > 0:
        checkpoint.restore(run_dir, job.start_step, stage, named, optimizer, tied_names, stages)
    loss_fn = loss_of(job.task, job.model)
    per_step = m * job.micro_batch_size
    samples = len(data.input_ids)
    for step in range(job.start_step, job.steps):
        started = time.perf_counter()
        inputs, target = batch_of(data, step_rows(step, per_step, samples), with_mask)
        parts = [x.split(job.micro_batch_size) for x in inputs]
        targets = target.split(job.micro_batch_size)
        optimizer.zero_grad()
        pending: list[Any] = []
        kept: dict[int, tuple[list[Any], list[Any]]] = {}
        losses: list[float] = []
        for mb in mine:  # forward
            received = _recv(who[stage - 1][mb], mb) if stage > 0 else []
            args = []
            for kind, source, item in wires[stage]:
                if kind == "input":
                    args.append(parts[source][mb])
                else:  # the previous stage's outputs, in order
                    args.append(received[item or 0])
            out = submod(*args)
            outs = list(out) if isinstance(out, tuple) else [out]
            if stage == last_stage:
                loss = loss_fn(outs[0], targets[mb])
                losses.append(float(loss.detach()))
                outs = [loss / m]
            else:
                _send(outs, who[stage + 1][mb], mb, pending)
            kept[mb] = (received, outs)
        for work in pending:
            work.wait()
        pending = []
        for mb in reversed(mine):  # backward
            received, outs = kept.pop(mb)
            if stage == last_stage:
                outs[0].backward()
            else:
                grads = _recv(who[stage + 1][mb], m + mb)
                needing = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
                if needing:
                    torch.autograd.backward([o for o, _ in needing], [g for _, g in needing])
            if stage > 0:
                back = [
                    (t.grad if t.grad is not None else torch.zeros_like(t))
                    if t.requires_grad
                    else torch.zeros(0)
                    for t in received
                ]
                _send(back, who[stage - 1][mb], m + mb, pending)
        for work in pending:
            work.wait()
        # Gradients: a stage's over its members, a tied weight's over every holder.
        sum_tied(tied)
        if stage_groups[stage] is not None:
            for parameter in trainable:
                if id(parameter) in tied_ids:
                    continue
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                dist.all_reduce(parameter.grad, group=stage_groups[stage])
        if job.clip > 0:
            clip_norm(job.clip, trainable, skip, counted=member == 0)
        optimizer.step()
        if stage == last_stage:
            summed = torch.tensor([sum(losses)], dtype=torch.float64)
            if stage_groups[stage] is not None:
                dist.all_reduce(summed, group=stage_groups[stage])
            if rank == world - 1:
                elapsed = time.perf_counter() - started
                line = {
                    "step": step,
                    "loss": float(summed) / m,
                    "step_ms": elapsed * 1000,
                    "samples": per_step,
                }
                report(line, relay)
        if relay is not None and rank == 0 and rank != world - 1:
            relay.forward(step)
        done = step + 1
        if job.checkpoint_every and done % job.checkpoint_every == 0 and done < job.steps:
            if member == 0:
                checkpoint.save(run_dir, done, stage, named, optimizer, skip)
            if relay is not None:
                relay.gather_checkpoint(run_dir, done, job)
            dist.barrier()
            if rank == 0:
                checkpoint.mark_complete(run_dir, done, stages)
    if member == 0:
        _save(submod, run_dir / f"stage-{stage}.safetensors", skip)
    (run_dir / f"stage-{rank}.json").write_text(json.dumps({"peak_rss_bytes": peak_rss()}) + "\n")

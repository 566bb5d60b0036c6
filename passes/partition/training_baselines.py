"""What `lamc train --dry-run --compare` sets beside the plan: the same training step
under the ways people split a model by hand, costed by the same model.

- equal split: the units in equal runs over every device, in the topology's order;
- memory-proportional: each device's share of the weights matches its share of memory;
- one device: the best single device the whole training state fits on;
- data parallelism: every device holds the whole model and its training state, takes a
  share of the micro-batches in proportion to its speed (one at a time, gradients
  accumulated), then the trainable gradients are all-reduced around a ring of the
  devices (2 (D - 1) steps of 1/D of them over the ring's slowest hop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lamc.passes.partition.baselines import equal_split, memory_split
from lamc.passes.partition.dp import Segment
from lamc.passes.partition.training import TrainingProblem, TrainingSolution
from lamc.training_cost import TrainingCost


@dataclass(frozen=True)
class TrainingAlternative:
    name: str
    description: str
    step_ms: float  # inf: does not fit
    segments: tuple[Segment, ...]
    reason: str = ""  # why it does not fit
    # Data parallelism: each replica's micro-batches a step (the segments' devices).
    shares: tuple[int, ...] = ()


def alternatives(cost: TrainingCost, problem: TrainingProblem) -> tuple[TrainingAlternative, ...]:
    n = cost.n
    devices = list(range(len(cost.devices)))
    names = [d.name for d in cost.devices]
    out: list[TrainingAlternative] = []

    def judge(name: str, description: str, segments: tuple[Segment, ...]) -> None:
        solution = problem.evaluate(segments)
        if solution is None:
            out.append(
                TrainingAlternative(
                    name, description, math.inf, segments, _why(cost, problem, segments)
                )
            )
        else:
            out.append(TrainingAlternative(name, description, solution.step_ms, segments))

    judge("equal split", f"{min(n, len(devices))} stages", equal_split(n, devices))
    judge(
        "memory-proportional", "weights by memory share", memory_split(n, devices, cost.inference)
    )
    singles = [(problem.evaluate((Segment(d, 0, n),)), d) for d in devices]
    fitting = [(s.step_ms, d) for s, d in singles if s is not None]
    if fitting:
        step, d = min(fitting)
        out.append(TrainingAlternative("one device", names[d], step, (Segment(d, 0, n),)))
    else:
        out.append(
            TrainingAlternative(
                "one device",
                "none holds it",
                math.inf,
                (),
                "no device holds the whole training state",
            )
        )
    out.append(data_parallel(cost, problem))
    return tuple(out)


def data_parallel(
    cost: TrainingCost, problem: TrainingProblem, *, memory: bool = True
) -> TrainingAlternative:
    """Every device a replica. With `memory=False` the step is costed even where the
    training state does not fit (`reason` says where): what a testbed that does not hold
    the devices to their memory measures."""
    n, m = cost.n, cost.spec.micro_batches
    devices = list(range(len(cost.devices)))
    # Gradient accumulation: one micro-batch's activations at a time.
    need = problem.base_memory[:, 0, n] + problem.activations[0, n]
    short = [cost.devices[d].name for d in devices if need[d] > problem.capacity[d]]
    over = f"the whole training state does not fit on {', '.join(short)}" if short else ""
    if short and memory:
        return TrainingAlternative("data parallel", f"{len(devices)} replicas", math.inf, (), over)
    # Plain training on each replica: no pipeline schedule to pay for.
    work = [
        float(problem.work[d, 0, n]) - cost.devices[d].training_schedule_overhead_ms
        for d in devices
    ]
    shares = _shares(work, m)
    compute = max(k * w for k, w in zip(shares, work))
    gradient = float(cost.trainable[0, n])
    count = len(devices)
    if count > 1 and gradient:
        ring = [
            cost.inference.topology.transfer_ms(
                cost.devices[a].name, cost.devices[(a + 1) % count].name, gradient / count
            )
            for a in range(count)
        ]
        reduce_ms = 2 * (count - 1) * max(ring)
    else:
        reduce_ms = 0.0
    update = max(float(problem.update[d, 0, n]) for d in devices)
    used = sum(1 for k in shares if k)
    return TrainingAlternative(
        "data parallel",
        f"{used} replicas, micro-batches {'/'.join(str(k) for k in shares)}",
        compute + reduce_ms + update,
        tuple(Segment(d, 0, n) for d, k in zip(devices, shares) if k),
        reason=over,
        shares=tuple(k for k in shares if k),
    )


def _shares(work_ms: list[float], micro_batches: int) -> list[int]:
    """Micro-batches per replica so that the slowest finishes first (greedy, exact for
    this objective: each next micro-batch goes where it ends soonest)."""
    shares = [0] * len(work_ms)
    for _ in range(micro_batches):
        d = min(range(len(work_ms)), key=lambda i: ((shares[i] + 1) * work_ms[i], i))
        shares[d] += 1
    return shares


def _why(cost: TrainingCost, problem: TrainingProblem, segments: tuple[Segment, ...]) -> str:
    for position, seg in enumerate(segments):
        from_end = len(segments) - position
        if not problem.fits(from_end)[seg.device, seg.start, seg.end]:
            memory = cost.memory(seg.device, seg.start, seg.end, from_end)
            return (
                f"stage {position} needs {memory.total / 2**30:.2f} GiB on "
                f"{cost.devices[seg.device].name} ({memory.capacity / 2**30:.2f} GiB)"
            )
    return "a link it needs has no route"


def as_alternative(solution: TrainingSolution) -> TrainingAlternative:
    return TrainingAlternative(
        "lamc", f"{len(solution.segments)} stages", solution.step_ms, solution.segments
    )

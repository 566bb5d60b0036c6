"""The exact training partitioner: the pipeline of stages over an ordered subset of the
devices that minimises the time of one optimiser step (`TrainingCost.step_ms`).

A step costs sum(W) + sum(L) + (m - 1) * max(W, L) + the first stage's update, and a stage's
memory depends on how many stages follow it (1F1B keeps min(m, r) micro-batches' activations
at the stage r from the end). Both are handled exactly:

- the stages are placed from the last one backwards, so the number placed so far is the
  new stage's distance from the end, and its memory check is exact;
- the bottleneck is fixed in turn to each candidate value B (every stage work and link
  time the tables hold), everything over B is ruled out, and a DP minimises
  sum(W) + sum(L) under that bound. The best plan has some bottleneck B*, and the
  minimum at B* is no worse than it, so the best over all B is optimal. Candidates run
  in ascending order and stop once (m - 1) * B plus the unbounded minimum of the sum can
  no longer beat the best found.

The optimiser update is the first stage's: its last backward ends the step, while every
later stage finished its own earlier, by at least the backward of the stages in front of
it, and updates in that slack. The search counts it with the first stage's work.

State g[S, d, j]: the least sum for units [j, n) on the stages of device set S, the
first of them on device d. A stage on device e covering [i, j) in front of it:

    g[S+e, e, i] = min_j ( W[e, i, j] + min_{d in S} (L[e, d, j] + g[S, d, j]) )

with W = inf where the stage does not fit at distance |S| + 1 from the end.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from lamc.passes.partition.dp import Segment
from lamc.training_cost import TrainingCost

# Devices the exact search takes (2^D device sets); more is refused with the reason.
MAX_DEVICES = 10


@dataclass(frozen=True)
class TrainingSolution:
    segments: tuple[Segment, ...]
    step_ms: float
    bottleneck_ms: float
    fill_ms: float  # sum of stage works and links (one micro-batch through and back)
    update_ms: float
    candidates: int  # bottleneck values tried


@dataclass
class TrainingProblem:
    work: np.ndarray  # [D, n+1, n+1] ms, inf where j >= k or not allowed
    link: np.ndarray  # [D, D, n+1] ms
    base_memory: np.ndarray  # [D, n+1, n+1] bytes besides activations
    activations: np.ndarray  # [n+1, n+1] bytes per micro-batch in flight
    capacity: np.ndarray  # [D] bytes
    update: np.ndarray  # [D, n+1, n+1] ms
    micro_batches: int
    gpipe: bool
    allowed: np.ndarray | None = None  # [D] bool: devices that may take a stage

    @classmethod
    def from_cost(cls, cost: TrainingCost) -> TrainingProblem:
        base, activations = cost.memory_tables()
        return cls(
            work=cost.work_table(),
            link=cost.link_table(),
            base_memory=base,
            activations=activations,
            capacity=np.array([d.memory_bytes for d in cost.devices], dtype=np.float64),
            update=cost.update_table(),
            micro_batches=cost.spec.micro_batches,
            gpipe=cost.spec.schedule == "gpipe",
        )

    @property
    def n_devices(self) -> int:
        return int(self.work.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.work.shape[1]) - 1

    def fits(self, from_end: int) -> np.ndarray:
        """[D, n+1, n+1] bool: a stage fits at this distance from the end."""
        kept = self.micro_batches if self.gpipe else min(self.micro_batches, from_end)
        need = self.base_memory + kept * self.activations[None, :, :]
        return need <= self.capacity[:, None, None]

    def evaluate(self, segments: tuple[Segment, ...]) -> TrainingSolution | None:
        """The step time of a given pipeline; None when a stage does not fit."""
        works, links, updates = [], [], []
        for position, seg in enumerate(segments):
            from_end = len(segments) - position
            if not self.fits(from_end)[seg.device, seg.start, seg.end]:
                return None
            works.append(float(self.work[seg.device, seg.start, seg.end]))
            updates.append(float(self.update[seg.device, seg.start, seg.end]))
            if position + 1 < len(segments):
                links.append(float(self.link[seg.device, segments[position + 1].device, seg.end]))
        bottleneck = max(works + links)
        if not math.isfinite(bottleneck):
            return None
        fill = sum(works) + sum(links)
        update = updates[0]
        return TrainingSolution(
            segments=segments,
            step_ms=fill + (self.micro_batches - 1) * bottleneck + update,
            bottleneck_ms=bottleneck,
            fill_ms=fill,
            update_ms=update,
            candidates=0,
        )


def solve(problem: TrainingProblem) -> TrainingSolution | None:
    """The optimal training pipeline, or None when no pipeline fits."""
    if problem.n_devices > MAX_DEVICES:
        raise ValueError(
            f"the training planner searches at most {MAX_DEVICES} devices exactly; "
            f"the topology has {problem.n_devices}"
        )
    fits = [problem.fits(r) for r in range(1, problem.n_devices + 1)]
    unbounded = _least_fill(problem, fits, math.inf)
    if unbounded is None:
        return None
    floor = unbounded[0]
    values = np.concatenate([problem.work.ravel(), problem.link.ravel()])
    values = np.unique(values[np.isfinite(values)])
    best: TrainingSolution | None = None
    tried = 0
    for bound in values:
        if best is not None and floor + (problem.micro_batches - 1) * bound >= best.step_ms:
            break
        tried += 1
        found = _least_fill(problem, fits, float(bound))
        if found is None:
            continue
        solution = problem.evaluate(found[1])
        assert solution is not None  # the search only places stages that fit
        if best is None or _better(solution, best):
            best = solution
    if best is None:
        return None
    return TrainingSolution(
        best.segments, best.step_ms, best.bottleneck_ms, best.fill_ms, best.update_ms, tried
    )


def _better(a: TrainingSolution, b: TrainingSolution) -> bool:
    """Lower step time; ties to fewer stages, then the earlier devices and cuts."""
    if a.step_ms < b.step_ms * (1 - 1e-12):
        return True
    if a.step_ms > b.step_ms * (1 + 1e-12):
        return False
    key_a = (len(a.segments), [(s.device, s.end) for s in a.segments])
    key_b = (len(b.segments), [(s.device, s.end) for s in b.segments])
    return key_a < key_b


def _least_fill(
    problem: TrainingProblem, fits: list[np.ndarray], bound: float
) -> tuple[float, tuple[Segment, ...]] | None:
    """The least sum of works and links over pipelines whose every stage and link is at
    most `bound` and fits, with its stages."""
    D, n = problem.n_devices, problem.n_units
    allowed = problem.allowed if problem.allowed is not None else np.ones(D, dtype=bool)
    link = np.where(problem.link <= bound, problem.link, math.inf)
    # g[mask][d]: [n+1] least fill for units [j, n) on the devices of mask, first on d.
    g: dict[int, dict[int, np.ndarray]] = {}
    back: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    best: tuple[float, int, int] | None = None
    for size in range(1, D + 1):
        for members in itertools.combinations(range(D), size):
            if not all(allowed[list(members)]):
                continue
            mask = sum(1 << e for e in members)
            g[mask] = {}
            for e in members:
                work = np.where(
                    fits[size - 1][e] & (problem.work[e] <= bound), problem.work[e], math.inf
                )  # [i, j]
                work[0] += problem.update[e][0]  # a first stage's update ends the step
                rest = mask & ~(1 << e)
                if rest == 0:
                    after = np.full(n + 1, math.inf)
                    after[n] = 0.0
                    via = np.full(n + 1, -1)
                else:
                    options = np.stack(
                        [
                            link[e, d] + g[rest][d] if d in g[rest] else np.full(n + 1, math.inf)
                            for d in range(D)
                        ]
                    )  # [D, n+1] at cut j
                    via = options.argmin(axis=0)
                    after = options.min(axis=0)
                total = work + after[None, :]  # [i, j]
                cut = total.argmin(axis=1)
                value = total[np.arange(n + 1), cut]
                g[mask][e] = value
                back[(mask, e)] = (cut, via)
                if math.isfinite(value[0]) and (best is None or value[0] < best[0] * (1 - 1e-12)):
                    best = (float(value[0]), mask, e)
    if best is None:
        return None
    segments = []
    _, mask, e = best
    i = 0
    while True:
        cut, via = back[(mask, e)]
        j = int(cut[i])
        segments.append(Segment(e, i, j))
        if j == n:
            break
        mask &= ~(1 << e)
        e, i = int(via[j]), j
    return best[0], tuple(segments)


def brute_force(problem: TrainingProblem) -> TrainingSolution | None:
    """Every ordered device subset and every cut placement (small instances; for tests)."""
    D, n = problem.n_devices, problem.n_units
    best: TrainingSolution | None = None
    for stages in range(1, min(D, n) + 1):
        for devices in itertools.permutations(range(D), stages):
            for cuts in itertools.combinations(range(1, n), stages - 1):
                bounds = (0, *cuts, n)
                segments = tuple(
                    Segment(d, bounds[k], bounds[k + 1]) for k, d in enumerate(devices)
                )
                solution = problem.evaluate(segments)
                if solution is not None and (best is None or solution.step_ms < best.step_ms):
                    best = solution
    return best

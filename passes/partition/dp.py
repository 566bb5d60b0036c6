"""The exact partitioner: the optimal pipeline over contiguous partitions of the units'
order and every ordered subset of the devices (each device holds at most one stage).

State `f[S, d, k]`: the best objective for units [0, k) using exactly the device set S,
the last stage on device d. A new stage on device e covering [j, k) extends it:

    throughput: f[S+e, e, k] = min_j max( min_{d in S} max(f[S, d, j], T[d, e, j]), C[e, j, k] )
    latency:    f[S+e, e, k] = min_j      min_{d in S}    (f[S, d, j] + T[d, e, j]) + C[e, j, k]

C holds inf wherever a stage is not allowed (memory, pins, forced cuts, co-location),
so constraints keep the search exact. The inner minimum over (j, k) is one numpy
operation on an (n+1) x (n+1) array, for O(2^D * D * n^2) work in all; 200 units on 8
devices plan in a fraction of a second.

Interchangeable devices (`device_classes`: the same costs, masks and links) form a
class, and S becomes how many of each class are used: exact, and polynomial in a class's
size. A table over the memory budget (`MEMORY_BUDGET_BYTES`, many distinct devices) is
searched with a beam instead, and the solution says so (`Solution.search`).

Throughput ties are broken by solving again for latency over the plans whose every
stage and transfer is within the optimal bottleneck: the result is the lowest-latency
plan among the throughput-optimal ones. Remaining ties go to fewer stages, then to the
lower device index, then to the earlier cut: the answer is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

THROUGHPUT = "throughput"
LATENCY = "latency"
_REL = 1e-9


@dataclass
class PartitionProblem:
    """Costs of every possible stage and transfer, in milliseconds.

    compute[d, j, k]: stage of units [j, k) on device d (inf if not allowed; j >= k unused)
    transfer[a, b, j]: cut j from device a to device b (inf without a route)
    inbound[d], outbound[d]: client to the first stage, last stage to the client
    """

    compute: np.ndarray
    transfer: np.ndarray
    inbound: np.ndarray
    outbound: np.ndarray
    stages: int | None = None

    @property
    def n_devices(self) -> int:
        return int(self.compute.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.compute.shape[1]) - 1


@dataclass(frozen=True)
class Segment:
    device: int
    start: int
    end: int  # exclusive


@dataclass
class Solution:
    objective: str
    segments: tuple[Segment, ...]
    bottleneck_ms: float
    latency_ms: float
    # Best objective value for each number of stages (inf: no feasible plan of that size).
    best_by_stages: dict[int, float] = field(default_factory=dict)
    search: str = "exact"  # how it was found: exact, exact over device classes, or beam

    @property
    def value(self) -> float:
        return self.bottleneck_ms if self.objective == THROUGHPUT else self.latency_ms


def evaluate(problem: PartitionProblem, segments: tuple[Segment, ...]) -> tuple[float, float]:
    """(bottleneck ms, latency ms) of a given plan; inf when any part is not allowed."""
    if not segments:
        return math.inf, math.inf
    terms_max = [problem.inbound[segments[0].device], problem.outbound[segments[-1].device]]
    total = float(problem.inbound[segments[0].device] + problem.outbound[segments[-1].device])
    for i, seg in enumerate(segments):
        c = float(problem.compute[seg.device, seg.start, seg.end])
        terms_max.append(c)
        total += c
        if i + 1 < len(segments):
            t = float(problem.transfer[seg.device, segments[i + 1].device, seg.end])
            terms_max.append(t)
            total += t
    return float(max(terms_max)), total


def solve(problem: PartitionProblem, objective: str) -> Solution | None:
    """The optimal plan, or None if no plan satisfies the constraints."""
    if objective not in (THROUGHPUT, LATENCY):
        raise ValueError(f"unknown objective {objective!r}")
    if objective == LATENCY:
        return _solve_once(problem, LATENCY)
    first = _solve_once(problem, THROUGHPUT)
    if first is None:
        return None
    bound = first.bottleneck_ms * (1 + _REL) + 1e-12
    masked = PartitionProblem(
        compute=np.where(problem.compute <= bound, problem.compute, math.inf),
        transfer=np.where(problem.transfer <= bound, problem.transfer, math.inf),
        inbound=np.where(problem.inbound <= bound, problem.inbound, math.inf),
        outbound=np.where(problem.outbound <= bound, problem.outbound, math.inf),
        stages=problem.stages,
    )
    second = _solve_once(masked, LATENCY)
    if second is None:  # cannot happen: the first solution satisfies the mask
        return first
    second.objective = THROUGHPUT
    second.best_by_stages = first.best_by_stages
    second.search = first.search
    return second


# What the exact search may allocate for its table (f: states x classes x cuts, float64).
MEMORY_BUDGET_BYTES = 256 * 2**20
# ... and the work it may do (states x classes x cuts^2 stage evaluations): about a second
# of numpy on a small CPU, per search.
WORK_BUDGET = 150_000_000
# States kept per number of devices used when the exact search is over either budget.
BEAM_WIDTH = 64


def device_classes(problem: PartitionProblem) -> list[list[int]]:
    """Devices that are interchangeable in every plan: the same stage costs (memory and
    constraint masks included), the same client transfers, the same transfers to and from
    every other device, and one transfer time between any two of them. The search counts
    how many of each class it uses instead of which ones: exact, and polynomial in the
    size of a class (64 identical boards are 65 states, not 2^64)."""
    compute, transfer = problem.compute, problem.transfer
    classes: list[list[int]] = []
    for d in range(problem.n_devices):
        for members in classes:
            r = members[0]
            if not (
                np.array_equal(compute[d], compute[r])
                and problem.inbound[d] == problem.inbound[r]
                and problem.outbound[d] == problem.outbound[r]
            ):
                continue
            inside = set(members)
            others = [x for x in range(problem.n_devices) if x != d and x not in inside]
            if not all(
                np.array_equal(transfer[d, x], transfer[r, x])
                and np.array_equal(transfer[x, d], transfer[x, r])
                for x in others
            ):
                continue
            within = transfer[r, members[1]] if len(members) > 1 else transfer[r, d]
            if all(
                np.array_equal(transfer[d, m], within) and np.array_equal(transfer[m, d], within)
                for m in members
            ):
                members.append(d)
                break
        else:
            classes.append([d])
    return classes


def _solve_once(problem: PartitionProblem, objective: str) -> Solution | None:
    d_count, n = problem.n_devices, problem.n_units
    if n == 0 or d_count == 0:
        return None
    classes = device_classes(problem)
    sizes = [len(c) for c in classes]
    states = math.prod(size + 1 for size in sizes)
    table_bytes = states * len(classes) * (n + 1) * 8
    work = states * len(classes) * (n + 1) ** 2
    if table_bytes <= MEMORY_BUDGET_BYTES and work <= WORK_BUDGET:
        search = _ClassSearch(problem, objective, classes)
        how = "exact" if max(sizes) == 1 else f"exact over {len(classes)} device class(es)"
    else:
        search = _ClassSearch(problem, objective, classes, beam=BEAM_WIDTH)
        how = (
            f"beam search, {BEAM_WIDTH} states per stage count (approximate: the exact search "
            f"would need {table_bytes / 2**30:.3g} GiB and {work:.3g} stage evaluations for "
            f"{d_count} devices in {len(classes)} class(es) and {n} units)"
        )
    solution = search.run()
    if solution is not None:
        solution.search = how
    return solution


class _ClassSearch:
    """The DP over how many devices of each class are used, the last stage's class, and
    the cut it ends at. With one device per class it is the subset DP of the module
    docstring. `beam` keeps only that many states per number of devices used, ranked by a
    lower bound of the plan they can finish (their prefix plus the rest of the units
    spread over their unused devices): an approximation for topologies too large for
    the table."""

    def __init__(
        self,
        problem: PartitionProblem,
        objective: str,
        classes: list[list[int]],
        beam: int | None = None,
    ) -> None:
        self.problem = problem
        self.objective = objective
        self.combine: np.ufunc = np.maximum if objective == THROUGHPUT else np.add
        self.classes = classes
        self.reps = [c[0] for c in classes]
        self.sizes = [len(c) for c in classes]
        self.beam = beam
        # f[counts] -> [classes, cuts]; a dict keyed by the count vector (sparse).
        self.f: dict[tuple[int, ...], np.ndarray] = {}

    def transfer(self, a: int, b: int) -> np.ndarray:
        """Cut transfer from a device of class a to another of class b (inf where there
        is no other device of the class)."""
        members = self.classes[a]
        if a == b:
            if len(members) < 2:
                return np.full(self.problem.n_units + 1, math.inf)
            return self.problem.transfer[members[0], members[1]]
        return self.problem.transfer[members[0], self.reps[b]]

    def run(self) -> Solution | None:
        problem, combine, m = self.problem, self.combine, len(self.classes)
        n = problem.n_units
        empty = tuple([0] * m)
        levels: list[list[tuple[int, ...]]] = [[] for _ in range(problem.n_devices + 1)]
        for b, rep in enumerate(self.reps):
            counts = _bump(empty, b)
            table = np.full((m, n + 1), math.inf)
            table[b] = combine(problem.inbound[rep], problem.compute[rep, 0, :])
            self.f[counts] = table
            levels[1].append(counts)
        limit = problem.stages if problem.stages is not None else problem.n_devices
        # Between classes [a, b, cut] (a == b: two devices of one class), and each class's
        # stage table [b, j, k]: every state's step is two numpy operations.
        hop = np.stack([np.stack([self.transfer(a, b) for b in range(m)]) for a in range(m)])
        stage = problem.compute[self.reps]
        sizes = np.array(self.sizes)
        for used in range(1, limit):
            frontier = self._prune(levels[used])
            for counts in frontier:
                table = self.f[counts]
                room = np.flatnonzero(np.array(counts) < sizes)
                if room.size == 0 or not np.isfinite(table).any():
                    continue
                # Arriving at cut j on a device of class b from the last stage's class a.
                arrive = combine(table[:, None, :], hop[:, room, :]).min(axis=0)
                best = combine(arrive[:, :, None], stage[room]).min(axis=1)
                for i, cls in enumerate(room.tolist()):
                    if not np.isfinite(best[i]).any():
                        continue
                    nxt = _bump(counts, cls)
                    if nxt not in self.f:
                        self.f[nxt] = np.full((m, n + 1), math.inf)
                        levels[used + 1].append(nxt)
                    np.minimum(self.f[nxt][cls], best[i], out=self.f[nxt][cls])
        return self._finish()

    def _prune(self, level: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        if self.beam is None or len(level) <= self.beam:
            return level
        problem, n = self.problem, self.problem.n_units
        # A lower bound of the finished plan per state: its prefix combined with the rest
        # of the units spread over its unused devices by speed (no transfers).
        with np.errstate(divide="ignore"):
            rate = 1.0 / problem.compute[:, :, n]  # [D, n+1]: how fast each device ends the model
        used = np.array(level)  # [S, classes]: devices of each class in use
        unused = np.zeros((len(level), problem.n_devices))
        for b, members in enumerate(self.classes):
            for j, d in enumerate(members):  # a class's devices are taken in order
                unused[:, d] = used[:, b] <= j
        speed = unused @ np.where(np.isfinite(rate), rate, 0.0)  # [S, n+1]
        with np.errstate(divide="ignore"):
            rest = np.where(speed > 0, 1.0 / np.maximum(speed, 1e-300), math.inf)
        rest[:, n] = 0.0
        # combine is monotone: the best last class per cut is all the bound needs.
        prefix = np.stack([self.f[counts].min(axis=0) for counts in level])  # [S, n+1]
        bounds = self.combine(prefix, rest).min(axis=1)
        order = sorted(range(len(level)), key=lambda i: (float(bounds[i]), level[i]))
        kept = [level[i] for i in order[: self.beam]]
        for counts in set(level) - set(kept):
            del self.f[counts]
        return kept

    def _finish(self) -> Solution | None:
        problem, combine, n = self.problem, self.combine, self.problem.n_units
        finals: list[tuple[float, int, tuple[int, ...], int]] = []
        best_by_stages: dict[int, float] = {}
        for counts, table in self.f.items():
            used = sum(counts)
            if problem.stages is not None and used != problem.stages:
                continue
            for a, count in enumerate(counts):
                if not count:
                    continue
                value = float(combine(table[a, n], problem.outbound[self.reps[a]]))
                if math.isfinite(value):
                    finals.append((value, used, counts, a))
                    best_by_stages[used] = min(best_by_stages.get(used, math.inf), value)
        if not finals:
            return None
        best_value = min(v for v, *_ in finals)
        tied = [item for item in finals if item[0] <= best_value * (1 + _REL) + 1e-12]
        fewest = min(item[1] for item in tied)
        # Among equals: fewest stages, then devices in declared order, then earlier cuts.
        candidates = [self._backtrack(counts, a) for _, used, counts, a in tied if used == fewest]
        segments = min(
            candidates, key=lambda segs: ([x.device for x in segs], [x.end for x in segs])
        )
        bottleneck, latency = evaluate(problem, segments)
        return Solution(
            self.objective, segments, bottleneck, latency, dict(sorted(best_by_stages.items()))
        )

    def _backtrack(self, counts: tuple[int, ...], a: int) -> tuple[Segment, ...]:
        """The stages as (class, start, end), then each class's uses given its devices in
        declared order (interchangeable, so any order has the same value)."""
        problem, combine = self.problem, self.combine
        k = problem.n_units
        steps: list[tuple[int, int, int]] = []
        while True:
            rest = _bump(counts, a, -1)
            if not any(rest):
                steps.append((a, 0, k))
                break
            target = self.f[counts][a, k]
            table = self.f.get(rest)
            if table is None:
                raise RuntimeError("backtracking reached a state the search did not keep")
            best: tuple[int, int] | None = None
            for j in range(k):
                c = problem.compute[self.reps[a], j, k]
                if not math.isfinite(c):
                    continue
                for d in range(len(self.classes)):
                    if not rest[d]:
                        continue
                    arrive = float(combine(table[d, j], self.transfer(d, a)[j]))
                    if (
                        math.isfinite(arrive)
                        and float(combine(arrive, c)) <= target * (1 + _REL) + 1e-12
                    ):
                        best = (j, d)
                        break
                if best is not None:
                    break
            if best is None:
                raise RuntimeError(
                    "backtracking found no predecessor; the DP table is inconsistent"
                )
            j, d = best
            steps.append((a, j, k))
            counts, a, k = rest, d, j
        steps.reverse()
        taken = [0] * len(self.classes)
        segments = []
        for cls, start, end in steps:
            segments.append(Segment(self.classes[cls][taken[cls]], start, end))
            taken[cls] += 1
        return tuple(segments)


def _bump(counts: tuple[int, ...], index: int, by: int = 1) -> tuple[int, ...]:
    return (*counts[:index], counts[index] + by, *counts[index + 1 :])

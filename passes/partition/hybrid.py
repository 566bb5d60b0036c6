"""Hybrid pipeline parallelism for training: a stage may run on a group of devices.

A group G takes a stage's units [i, j) on every member; each micro-batch of a step goes to
one member, the shares fixed so that the group's slowest member finishes first (greedy,
exact for identical micro-batches on devices of different speeds), and after the step's
last backward the members' trainable gradients are all-reduced around a ring of the group
(2 (k - 1) steps of 1/k of them over the ring's slowest hop). Per micro-batch the group
takes T_G / m, T_G = max over members of share x work. A micro-batch crossing from one
group to the next takes the slowest link between any member of the one and any of the
other. Each member holds the whole stage and the activations of its whole share: a
pipeline with replicated stages runs GPipe's order (all forwards of a step before its
backwards) whatever the schedule, so a stage of one device in it keeps all m.

The step of a pipeline of groups is the chain's formula with T_G / m for each stage's
work, the ring all-reduces of every replicated stage added (conservatively: as if none
overlapped another stage's work) and the first stage's update:

    step = sum(W) + sum(L) + (m - 1) * max(W, L) + update(first) + sum(all-reduce)

Groups of one device are the chain's stages, and one group of every device is data
parallelism, so the search covers both. It is exact over ordered sequences of disjoint
groups, as `passes.partition.training` is over ordered devices: the bottleneck B is fixed
to each candidate value in turn and a DP over (devices used, first group) minimises the
rest; `brute_force` checks it on small instances. The state space is 3^D, so the search
takes at most `MAX_DEVICES` devices, and only within `WORK_BUDGET`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from lamc.passes.partition.training import TrainingProblem

MAX_DEVICES = 5
# The search's work grows as 4^D (n+1)^2 (device sets, first groups, the groups after, and
# the cuts): 4 devices and 12 units take about 1.5 s here, 4 and 24 about 8 s. Past this
# budget it does not run (a plan says so).
WORK_BUDGET = 45_000


def searchable(devices: int, units: int) -> bool:
    """Whether the search takes `devices` devices and `units` units within its budget."""
    return devices <= MAX_DEVICES and 4**devices * (units + 1) ** 2 <= WORK_BUDGET


@dataclass(frozen=True)
class GroupStage:
    members: tuple[int, ...]  # device indices
    start: int
    end: int
    shares: tuple[int, ...]  # micro-batches a step, per member


@dataclass(frozen=True)
class HybridSolution:
    stages: tuple[GroupStage, ...]
    step_ms: float
    bottleneck_ms: float
    reduce_ms: float  # the all-reduces of the replicated stages

    @property
    def replicated(self) -> bool:
        return any(len(s.members) > 1 for s in self.stages)


class HybridProblem:
    """The training problem with device groups. `trainable[i, j]`: bytes of the trainable
    weights of units [i, j); `latency[a, b]` ms and `per_byte[a, b]` ms a byte between two
    devices (inf without a route)."""

    def __init__(
        self,
        problem: TrainingProblem,
        trainable: np.ndarray,
        latency: np.ndarray,
        per_byte: np.ndarray,
    ) -> None:
        self.problem = problem
        D, n, m = problem.n_devices, problem.n_units, problem.micro_batches
        self.D, self.n, self.m = D, n, m
        allowed = problem.allowed if problem.allowed is not None else np.ones(D, dtype=bool)
        self.groups = [
            mask for mask in range(1, 1 << D) if all(allowed[e] for e in range(D) if mask >> e & 1)
        ]
        self.members = {g: tuple(e for e in range(D) if g >> e & 1) for g in self.groups}
        upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), k=1)
        self._links: dict[tuple[int, int], np.ndarray] = {}
        # Per group: micro-batches per member [k, n+1, n+1], the group's time a step for
        # them, its update and its ring all-reduce.
        self.shares: dict[int, np.ndarray] = {}
        self.busy: dict[int, np.ndarray] = {}
        self.update: dict[int, np.ndarray] = {}
        self.reduce: dict[int, np.ndarray] = {}
        for g in self.groups:
            members = self.members[g]
            work = problem.work[list(members)]  # [k, n+1, n+1]
            shares = np.zeros(work.shape, dtype=np.int64)
            for _ in range(m):
                ends = np.where(np.isfinite(work), (shares + 1) * work, math.inf)
                pick = ends.argmin(axis=0)
                np.put_along_axis(
                    shares, pick[None], np.take_along_axis(shares, pick[None], axis=0) + 1, 0
                )
            with np.errstate(invalid="ignore"):  # 0 micro-batches x a stage that cannot run
                busy = np.where(shares > 0, shares * work, 0.0).max(axis=0)
            # A member without a micro-batch is no member: the smaller group covers it.
            useless = (shares == 0).any(axis=0) | ~np.isfinite(work).all(axis=0) | ~upper
            self.shares[g] = shares
            self.busy[g] = np.where(useless, math.inf, busy)
            self.update[g] = problem.update[list(members)].max(axis=0)
            k = len(members)
            if k == 1:
                self.reduce[g] = np.zeros((n + 1, n + 1))
            else:
                ring = [(members[a], members[(a + 1) % k]) for a in range(k)]
                hop = np.max(
                    [latency[a, b] + per_byte[a, b] * trainable / k for a, b in ring], axis=0
                )  # [n+1, n+1]: the ring's slowest hop
                self.reduce[g] = np.where(trainable > 0, 2 * (k - 1) * hop, 0.0)

    def fits(self, g: int) -> np.ndarray:
        """[n+1, n+1] bool: every member holds the stage with its share's activations
        (GPipe's order keeps all of them, wherever the stage is in the pipeline)."""
        p = self.problem
        members = list(self.members[g])
        kept = self.shares[g]
        need = p.base_memory[members] + kept * p.activations[None, :, :]
        fit: np.ndarray = (need <= p.capacity[members][:, None, None]).all(axis=0)
        return fit

    def link_row(self, g: int, h: int) -> np.ndarray:
        """[n+1]: the slowest link from a member of g to one of h, at each cut."""
        row = self._links.get((g, h))
        if row is None:
            p = self.problem
            row = p.link[np.ix_(self.members[g], self.members[h])].reshape(-1, self.n + 1)
            row = row.max(axis=0)
            self._links[(g, h)] = row
        return row

    def link(self, g: int, h: int, cut: int) -> float:
        return float(self.link_row(g, h)[cut])

    def evaluate(self, stages: tuple[tuple[int, int, int], ...]) -> HybridSolution | None:
        """(group mask, start, end) per stage -> the step, or None when a stage does not
        fit or a group shares a device with another."""
        used = 0
        for g, _, _ in stages:
            if used & g:
                return None
            used |= g
        works, links, reduces = [], [], []
        for position, (g, i, j) in enumerate(stages):
            if not self.fits(g)[i, j]:
                return None
            works.append(float(self.busy[g][i, j]) / self.m)
            reduces.append(float(self.reduce[g][i, j]))
            if position + 1 < len(stages):
                links.append(self.link(g, stages[position + 1][0], j))
        bottleneck = max(works + links)
        if not math.isfinite(bottleneck):
            return None
        first, i0, j0 = stages[0]
        step = (
            sum(works)
            + sum(links)
            + (self.m - 1) * bottleneck
            + float(self.update[first][i0, j0])
            + sum(reduces)
        )
        return HybridSolution(
            stages=tuple(
                GroupStage(
                    self.members[g],
                    i,
                    j,
                    tuple(int(x) for x in self.shares[g][:, i, j]),
                )
                for g, i, j in stages
            ),
            step_ms=step,
            bottleneck_ms=bottleneck,
            reduce_ms=sum(reduces),
        )


def solve(hybrid: HybridProblem) -> HybridSolution | None:
    """The fastest pipeline of device groups, or None when none fits."""
    if hybrid.D > MAX_DEVICES:
        raise ValueError(
            f"replicated stages are searched over at most {MAX_DEVICES} devices; "
            f"the topology has {hybrid.D}"
        )
    fits = {g: hybrid.fits(g) for g in hybrid.groups}
    unbounded = _least(hybrid, fits, math.inf)
    if unbounded is None:
        return None
    floor = unbounded[0]
    values = [hybrid.busy[g][np.isfinite(hybrid.busy[g])] / hybrid.m for g in hybrid.groups]
    links = hybrid.problem.link[np.isfinite(hybrid.problem.link)]
    candidates = np.unique(np.concatenate([*values, links]))
    best: HybridSolution | None = None
    for bound in candidates:
        if best is not None and floor + (hybrid.m - 1) * bound >= best.step_ms:
            break
        found = _least(hybrid, fits, float(bound))
        if found is None:
            continue
        solution = hybrid.evaluate(found[1])
        if solution is not None and (best is None or solution.step_ms < best.step_ms * (1 - 1e-12)):
            best = solution
    return best


def _least(
    hybrid: HybridProblem, fits: dict[int, np.ndarray], bound: float
) -> tuple[float, tuple[tuple[int, int, int], ...]] | None:
    """The least sum of works, links, all-reduces and the first stage's update over
    pipelines of groups whose every stage and link is at most `bound`, with its stages.

    g[(S, G)][i]: units [i, n) on stages whose groups cover the device set S, the first of
    them G (a stage's memory does not depend on its place: GPipe's order)."""
    n, m = hybrid.n, hybrid.m
    values: dict[tuple[int, int], np.ndarray] = {}
    back: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    best: tuple[float, int, int] | None = None
    for S in sorted(range(1, 1 << hybrid.D), key=lambda s: bin(s).count("1")):
        for G in hybrid.groups:
            if G & ~S:
                continue
            rest = S & ~G
            per = hybrid.busy[G] / m
            stage = np.where(per <= bound, per + hybrid.reduce[G], math.inf)
            stage[0] = stage[0] + hybrid.update[G][0]  # a first stage's update ends the step
            if rest == 0:
                after = np.full(n + 1, math.inf)
                after[n] = 0.0
                via = np.full(n + 1, -1)
            else:
                options, keys = [], []
                for H in hybrid.groups:
                    following = values.get((rest, H))
                    if H & ~rest or following is None:
                        continue
                    link = hybrid.link_row(G, H)
                    options.append(np.where(link <= bound, link, math.inf) + following)
                    keys.append(H)
                if not options:
                    continue
                stacked = np.stack(options)
                via = np.array(keys)[stacked.argmin(axis=0)]
                after = stacked.min(axis=0)
            total = np.where(fits[G], stage + after[None, :], math.inf)  # [i, j]
            cut = total.argmin(axis=1)
            value = total[np.arange(n + 1), cut]
            values[(S, G)] = value
            back[(S, G)] = (cut, via)
            if math.isfinite(value[0]) and (best is None or value[0] < best[0] * (1 - 1e-12)):
                best = (float(value[0]), S, G)
    if best is None:
        return None
    stages = []
    _, S, G = best
    i = 0
    while True:
        cut, via = back[(S, G)]
        j = int(cut[i])
        stages.append((G, i, j))
        if j == n:
            break
        S, G, i = S & ~G, int(via[j]), j
    return best[0], tuple(stages)


def brute_force(hybrid: HybridProblem) -> HybridSolution | None:
    """Every ordered sequence of disjoint groups and every cut placement (for tests)."""
    n = hybrid.n
    best: HybridSolution | None = None
    for count in range(1, min(hybrid.D, n) + 1):
        for groups in disjoint_sequences(hybrid.groups, count):
            for cuts in itertools.combinations(range(1, n), count - 1):
                bounds = (0, *cuts, n)
                stages = tuple((g, bounds[k], bounds[k + 1]) for k, g in enumerate(groups))
                solution = hybrid.evaluate(stages)
                if solution is not None and (best is None or solution.step_ms < best.step_ms):
                    best = solution
    return best


def disjoint_sequences(groups: list[int], count: int, used: int = 0) -> list[tuple[int, ...]]:
    """Every ordered sequence of `count` pairwise disjoint device masks from `groups`
    (none sharing a device with `used`): what brute force enumerates."""
    if count == 0:
        return [()]
    out = []
    for g in groups:
        if g & used:
            continue
        out += [(g, *rest) for rest in disjoint_sequences(groups, count - 1, used | g)]
    return out

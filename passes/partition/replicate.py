"""Replicated stages for inference throughput (`lamc plan --replicate`).

A stage may run on a group of devices, each holding the whole stage: requests reach the
members round-robin by speed, member e taking the share w_e = (1 / c_e) / sum(1 / c) of
them, where c_e is the stage's time on it. The group then takes, per request,

    period(G) = 1 / sum_e (1 / c_e)       (each member busy w_e c_e, the same for all)

and a request's expected time in it is sum_e w_e c_e = |G| period(G). Every member routes
to the next group by the same shares, independently, so the pair (a, b) carries w_a w_b of
the requests: the link from G to H is busy max_(a,b) w_a w_b T[a, b] per request, and a
request's expected transfer is sum_(a,b) w_a w_b T[a, b]. The client's inputs and the
last stage's outputs count the same way over the first and last groups.

The plan minimises the bottleneck (the largest period of any stage, link, inbound or
outbound), then the expected latency, over ordered sequences of disjoint groups and the
cuts between them. Groups of one device are the chain's stages, so a chain is among the
answers. The shares of a link depend on the unit ranges of both groups it joins, so the
search keeps each stage's range in its state: for a bound B on every period, a DP over
(devices used, last group, the last stage's range) gives the least expected latency, and
B is bisected over every period that can occur. It is exact for speed-proportional
round-robin; `brute_force` checks it on small instances. The work grows as 4^D (n+1)^3
per bound tried, so the search takes at most `MAX_DEVICES` devices, within `WORK_BUDGET`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lamc.passes.partition.dp import PartitionProblem
from lamc.passes.partition.hybrid import disjoint_sequences

MAX_DEVICES = 5
# 4^D (n+1)^3 per bound tried, about 20 bounds: 4 devices and 41 units, 5 and 25, or 3 and
# 60 take 0.4-1.5 s here (and up to ~100 MB for the links' tables).
WORK_BUDGET = 20_000_000
_REL = 1e-9


def searchable(devices: int, units: int) -> bool:
    """Whether the search takes `devices` devices and `units` units within its budget."""
    return devices <= MAX_DEVICES and 4**devices * (units + 1) ** 3 <= WORK_BUDGET


@dataclass(frozen=True)
class GroupStage:
    members: tuple[int, ...]  # device indices
    start: int
    end: int  # exclusive
    shares: tuple[float, ...]  # of the requests, per member (they sum to 1)
    compute_ms: tuple[float, ...]  # the stage's time on each member
    period_ms: float  # per request, the group together
    link_ms: float  # the period of its link to the next group (the last: to the client)


@dataclass(frozen=True)
class ReplicatedSolution:
    stages: tuple[GroupStage, ...]
    bottleneck_ms: float
    latency_ms: float  # expected over the round-robin
    inbound_ms: float  # the period of the client's link to the first group

    @property
    def replicated(self) -> bool:
        return any(len(s.members) > 1 for s in self.stages)


class ReplicatedProblem:
    """The inference problem (`PartitionProblem`: compute inf where a stage is not
    allowed) with device groups; `compatible(a, b)`: whether two devices may serve one
    stage together (one engine for both)."""

    def __init__(
        self, problem: PartitionProblem, compatible: Callable[[int, int], bool] | None = None
    ) -> None:
        self.problem = problem
        D, n = problem.n_devices, problem.n_units
        self.D, self.n = D, n
        ok = compatible or (lambda a, b: True)
        self.groups = [
            g
            for g in range(1, 1 << D)
            if all(ok(a, b) for a, b in itertools.combinations(_members(g), 2))
        ]
        self.members = {g: _members(g) for g in self.groups}
        self.shares: dict[int, np.ndarray] = {}  # [k, n+1, n+1]
        self.period: dict[int, np.ndarray] = {}  # [n+1, n+1], inf where a member cannot
        upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), k=1)
        for g in self.groups:
            work = problem.compute[list(self.members[g])]  # [k, n+1, n+1]
            usable = np.isfinite(work).all(axis=0) & upper & (work > 0).all(axis=0)
            safe = np.where(usable[None], work, 1.0)
            speed = (1.0 / safe).sum(axis=0)
            self.shares[g] = np.where(usable[None], (1.0 / safe) / speed[None], 0.0)
            self.period[g] = np.where(usable, 1.0 / speed, math.inf)
        # Computed once each, not at every bound the search tries.
        self._links: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._ends: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray]] = {}

    def ends(self, g: int, inbound: bool) -> tuple[np.ndarray, np.ndarray]:
        """(period, expected ms) of the client's link to g on [0, j), per j (inbound), or
        of g's on [i, n) to the client, per i."""
        cached = self._ends.get((g, inbound))
        if cached is None:
            cached = self._ends[(g, inbound)] = self._client_link(g, inbound)
        return cached

    def _client_link(self, g: int, inbound: bool) -> tuple[np.ndarray, np.ndarray]:
        p = self.problem
        w = self.shares[g][:, 0, :] if inbound else self.shares[g][:, :, self.n]
        cost = (p.inbound if inbound else p.outbound)[list(self.members[g])][:, None]
        finite = np.isfinite(cost)
        term = np.where(finite, w * np.where(finite, cost, 0.0), math.inf)
        term = np.where(w > 0, term, 0.0)
        return term.max(axis=0), term.sum(axis=0)

    def link(self, g: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """(period, expected ms) [i, j, k] of the link from g on [i, j) to h on [j, k)."""
        cached = self._links.get((g, h))
        if cached is not None:
            return cached
        T = self.problem.transfer
        wg, wh = self.shares[g], self.shares[h]
        period = np.zeros((self.n + 1,) * 3)
        expected = np.zeros((self.n + 1,) * 3)
        for x, a in enumerate(self.members[g]):
            for y, b in enumerate(self.members[h]):
                t = T[a, b]  # [n+1] per cut j
                weight = wg[x][:, :, None] * wh[y][None, :, :]  # [i, j, k]
                finite = np.isfinite(t)[None, :, None]
                term = np.where(
                    finite, weight * np.where(np.isfinite(t), t, 0.0)[None, :, None], math.inf
                )
                term = np.where(weight > 0, term, 0.0)
                period = np.maximum(period, term)
                expected = expected + term
        self._links[(g, h)] = (period, expected)
        return period, expected

    def evaluate(self, stages: tuple[tuple[int, int, int], ...]) -> ReplicatedSolution | None:
        """(group mask, start, end) per stage -> the plan's costs, or None when a stage is
        not allowed on a member, two groups share a device, or a link has no route."""
        used = 0
        for g, _, _ in stages:
            if used & g:
                return None
            used |= g
        periods: list[float] = []
        latency = 0.0
        links: list[float] = []
        for position, (g, i, j) in enumerate(stages):
            period = float(self.period[g][i, j])
            periods.append(period)
            latency += len(self.members[g]) * period
            if position + 1 < len(stages):
                h, _, k = stages[position + 1]
                lp, le = self.link(g, h)
                links.append(float(lp[i, j, k]))
                latency += float(le[i, j, k])
            else:
                op, oe = self.ends(g, inbound=False)
                links.append(float(op[i]))
                latency += float(oe[i])
        g0, _, j0 = stages[0]
        ip, ie = self.ends(g0, inbound=True)
        inbound = float(ip[j0])
        latency += float(ie[j0])
        bottleneck = max([*periods, *links, inbound])
        if not math.isfinite(bottleneck):
            return None
        return ReplicatedSolution(
            stages=tuple(
                GroupStage(
                    members=self.members[g],
                    start=i,
                    end=j,
                    shares=tuple(float(x) for x in self.shares[g][:, i, j]),
                    compute_ms=tuple(float(self.problem.compute[e, i, j]) for e in self.members[g]),
                    period_ms=periods[position],
                    link_ms=links[position],
                )
                for position, (g, i, j) in enumerate(stages)
            ),
            bottleneck_ms=bottleneck,
            latency_ms=latency,
            inbound_ms=inbound,
        )


def _members(g: int) -> tuple[int, ...]:
    return tuple(e for e in range(g.bit_length()) if g >> e & 1)


def solve(rp: ReplicatedProblem) -> ReplicatedSolution | None:
    """The plan of least bottleneck, then least expected latency; None when none fits."""
    if rp.D > MAX_DEVICES:
        raise ValueError(
            f"replicated stages are searched over at most {MAX_DEVICES} devices; "
            f"the topology has {rp.D}"
        )
    values = [rp.period[g][np.isfinite(rp.period[g])] for g in rp.groups]
    for g in rp.groups:
        for inbound in (True, False):
            p, _ = rp.ends(g, inbound)
            values.append(p[np.isfinite(p)])
    for g in rp.groups:
        for h in rp.groups:
            if g & h:
                continue
            p, _ = rp.link(g, h)
            values.append(p[np.isfinite(p)])
    candidates = np.unique(np.concatenate(values))
    if candidates.size == 0:
        return None
    best = _least(rp, float(candidates[-1]) * (1 + _REL))
    if best is None:
        return None
    lo, hi = 0, candidates.size - 1  # the least feasible bound is candidates[hi]: `best`
    while lo < hi:
        mid = (lo + hi) // 2
        found = _least(rp, float(candidates[mid]) * (1 + _REL))
        if found is None:
            lo = mid + 1
        else:
            hi, best = mid, found
    return rp.evaluate(best)


def _least(rp: ReplicatedProblem, bound: float) -> tuple[tuple[int, int, int], ...] | None:
    """The stages of least expected latency with every period at most `bound`.

    f[(S, G)][i, j]: units [0, j), the last stage on group G over [i, j), devices S used."""
    n = rp.n
    inf = math.inf
    f: dict[tuple[int, int], np.ndarray] = {}
    back: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # predecessor G', h
    stage = {
        g: np.where(rp.period[g] <= bound, len(rp.members[g]) * rp.period[g], inf)
        for g in rp.groups
    }
    best: tuple[float, int, int, int] | None = None
    for S in sorted(range(1, 1 << rp.D), key=lambda s: bin(s).count("1")):
        for G in rp.groups:
            if G & ~S:
                continue
            prev = S & ~G
            if prev == 0:
                ip, ie = rp.ends(G, inbound=True)
                value = np.full((n + 1, n + 1), inf)
                value[0] = np.where(ip <= bound, ie, inf) + stage[G][0]
                came = (np.full((n + 1, n + 1), -1), np.full((n + 1, n + 1), -1))
            else:
                value = np.full((n + 1, n + 1), inf)
                via_g = np.full((n + 1, n + 1), -1)
                via_h = np.full((n + 1, n + 1), -1)
                for H in rp.groups:
                    before = f.get((prev, H))
                    if H & ~prev or before is None:
                        continue
                    lp, le = rp.link(H, G)  # [h, i, j]
                    through = before[:, :, None] + np.where(lp <= bound, le, inf)
                    h = through.argmin(axis=0)  # [i, j]
                    total = np.take_along_axis(through, h[None], axis=0)[0] + stage[G]
                    better = total < value
                    value = np.where(better, total, value)
                    via_g = np.where(better, H, via_g)
                    via_h = np.where(better, h, via_h)
                came = (via_g, via_h)
            f[(S, G)] = value
            back[(S, G)] = came
            op, oe = rp.ends(G, inbound=False)
            closing = value[:, n] + np.where(op <= bound, oe, inf)
            i = int(closing.argmin())
            if math.isfinite(closing[i]) and (best is None or closing[i] < best[0] * (1 - 1e-12)):
                best = (float(closing[i]), S, G, i)
    if best is None:
        return None
    _, S, G, i = best
    j = n
    stages: list[tuple[int, int, int]] = []
    while True:
        stages.append((G, i, j))
        via_g, via_h = back[(S, G)]
        H, h = int(via_g[i, j]), int(via_h[i, j])
        if H < 0:
            break
        S, G, i, j = S & ~G, H, h, i
    return tuple(reversed(stages))


def brute_force(rp: ReplicatedProblem) -> ReplicatedSolution | None:
    """Every ordered sequence of disjoint groups and every cut placement (for tests)."""
    n = rp.n
    best: ReplicatedSolution | None = None
    for count in range(1, min(rp.D, n) + 1):
        for groups in disjoint_sequences(rp.groups, count):
            for cuts in itertools.combinations(range(1, n), count - 1):
                bounds = (0, *cuts, n)
                stages = tuple((g, bounds[k], bounds[k + 1]) for k, g in enumerate(groups))
                solution = rp.evaluate(stages)
                if solution is None:
                    continue
                if best is None or _better(solution, best):
                    best = solution
    return best


def _better(a: ReplicatedSolution, b: ReplicatedSolution) -> bool:
    if a.bottleneck_ms < b.bottleneck_ms * (1 - _REL):
        return True
    tie = a.bottleneck_ms <= b.bottleneck_ms * (1 + _REL)
    return tie and a.latency_ms < b.latency_ms * (1 - 1e-12)

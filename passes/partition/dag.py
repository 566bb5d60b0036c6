"""Branch-parallel plans: a model whose inputs enter independent branches that merge later
(CLIP's two towers, an encoder per sensor feeding a fusion model or a language model) is
planned as a DAG of stages instead of one chain.

The plans searched here are fork-join pipelines. Each branch either runs as a chain of
stages of its own, on devices of its own, and hands its outputs to the join stage, or is
absorbed into the main chain: the absorbed branches, then the trunk (everything from the
first unit that reads two branches on), as one chain whose first stage is the join. With
every branch absorbed the plan is a chain; the planner keeps the chain's own search and
takes a DAG plan only when it is strictly better.

Costs, for objective throughput (`max`) and latency (`+`), with `combine` either:

    branch b on devices S_b, last stage on d:  f_b[S_b, d] = the chain DP's value, its
        inputs from where they originate included; at the join device e it arrives with
        g_b[S_b, e] = min_d combine(f_b[S_b, d], T_b[d, e])
    the join on e starts once everything has arrived:
        arrival = max(inbound_main[e], max_b g_b[S_b, e])
    the plan:  combine(arrival, h[e, S_main]), h the main chain's DP from e on

(for throughput every term is a bound on the period; for latency the branches run at the
same time, so the join waits for the slowest). The search is exact over this family: the
chain DPs are the subset DP of `dp`, the branches share out the devices the main chain
leaves through a min-max subset convolution, and every own/absorbed split of the
branches is tried. Throughput ties go to the lowest latency, as in `dp`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from lamc.passes.partition.dp import LATENCY, THROUGHPUT, Segment

_REL = 1e-9
# The search enumerates submasks of the devices (3^D per branch and join device).
MAX_DEVICES = 8


@dataclass
class Chain:
    """One chain's costs in ms, as `dp.PartitionProblem` has them.

    compute[d, j, k]: units [j, k) on device d (inf where not allowed)
    transfer[a, b, j]: cut j from a to b; for a branch, cut n is its outputs to the join
    inbound[d]: its model inputs from where they originate to a first stage on d
    outbound[d]: the last stage's outputs to the client (the main chain only)
    """

    compute: np.ndarray
    transfer: np.ndarray
    inbound: np.ndarray
    outbound: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.compute.shape[1]) - 1

    def masked(self, bound: float) -> Chain:
        def cap(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.where(a <= bound, a, math.inf)

        out = cap(self.outbound)
        return Chain(cap(self.compute), cap(self.transfer), cap(self.inbound), out)  # type: ignore[arg-type]


@dataclass
class DagProblem:
    """The branches, and for each set of branches run on stages of their own, the main
    chain that is left (the other branches, then the trunk)."""

    branches: list[Chain]
    mains: dict[frozenset[int], Chain]

    @property
    def n_devices(self) -> int:
        return int(self.branches[0].compute.shape[0])


@dataclass
class DagSolution:
    objective: str
    own: tuple[int, ...]  # the branches on stages of their own, in branch order
    branches: tuple[tuple[Segment, ...], ...]  # each own branch's stages
    main: tuple[Segment, ...]  # the join stage first
    bottleneck_ms: float
    latency_ms: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def value(self) -> float:
        return self.bottleneck_ms if self.objective == THROUGHPUT else self.latency_ms

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(s.device for segs in (*self.branches, self.main) for s in segs)


def _chain_terms(chain: Chain, segments: tuple[Segment, ...]) -> tuple[list[float], float] | None:
    """The chain's terms (first stage's inbound excluded), and its summed time; None if a
    stage does not cover the chain's units in order."""
    if not segments or segments[0].start != 0 or segments[-1].end != chain.n:
        return None
    terms: list[float] = []
    total = 0.0
    for i, seg in enumerate(segments):
        if seg.end <= seg.start or (i and segments[i - 1].end != seg.start):
            return None
        c = float(chain.compute[seg.device, seg.start, seg.end])
        terms.append(c)
        total += c
        if i + 1 < len(segments):
            t = float(chain.transfer[seg.device, segments[i + 1].device, seg.end])
            terms.append(t)
            total += t
    return terms, total


def evaluate_dag(
    problem: DagProblem,
    own: tuple[int, ...],
    branches: tuple[tuple[Segment, ...], ...],
    main: tuple[Segment, ...],
) -> tuple[float, float]:
    """(bottleneck ms, latency ms) of a fork-join plan, straight from its definition; inf
    when a device is used twice, a chain is malformed or a part is not allowed."""
    key = frozenset(own)
    if not own or key not in problem.mains or len(branches) != len(own):
        return math.inf, math.inf
    devices = [s.device for segs in (*branches, main) for s in segs]
    if len(set(devices)) != len(devices):
        return math.inf, math.inf
    chain = problem.mains[key]
    main_terms = _chain_terms(chain, main)
    if main_terms is None:
        return math.inf, math.inf
    e = main[0].device
    peak = [float(chain.inbound[e])]
    arrival = float(chain.inbound[e])
    for b, segs in zip(own, branches):
        branch = problem.branches[b]
        found = _chain_terms(branch, segs)
        if found is None:
            return math.inf, math.inf
        terms, total = found
        first, last = segs[0].device, segs[-1].device
        inbound = float(branch.inbound[first])
        hand = float(branch.transfer[last, e, branch.n])
        peak += [inbound, hand, *terms]
        arrival = max(arrival, inbound + total + hand)
    terms, total = main_terms
    assert chain.outbound is not None
    out = float(chain.outbound[main[-1].device])
    peak += [*terms, out]
    return max(peak), arrival + total + out


def solve_dag(problem: DagProblem, objective: str) -> DagSolution | None:
    """The best fork-join plan with at least one branch on stages of its own (None: none
    is allowed, or the topology is larger than the search takes)."""
    if objective not in (THROUGHPUT, LATENCY):
        raise ValueError(f"unknown objective {objective!r}")
    if problem.n_devices > MAX_DEVICES or not problem.branches:
        return None
    if objective == LATENCY:
        return _Search(problem, LATENCY).run()
    first = _Search(problem, THROUGHPUT).run()
    if first is None:
        return None
    bound = first.bottleneck_ms * (1 + _REL) + 1e-12
    masked = DagProblem(
        [b.masked(bound) for b in problem.branches],
        {k: m.masked(bound) for k, m in problem.mains.items()},
    )
    second = _Search(masked, LATENCY).run()
    if second is None:  # cannot happen: the first plan passes the mask
        return first
    bottleneck, latency = evaluate_dag(problem, second.own, second.branches, second.main)
    return DagSolution(THROUGHPUT, second.own, second.branches, second.main, bottleneck, latency)


def _bits(mask: int) -> list[int]:
    return [d for d in range(mask.bit_length()) if mask >> d & 1]


def _submasks(mask: int) -> list[int]:
    """Non-empty submasks of `mask`, ascending."""
    found = []
    sub = mask
    while sub:
        found.append(sub)
        sub = (sub - 1) & mask
    return sorted(found)


class _ChainDP:
    """The subset DP of one chain: f[mask][d, k], the best value of units [0, k) on exactly
    the devices in `mask`, the last stage on d, its first stage's start cost from `start`."""

    def __init__(self, chain: Chain, start: np.ndarray, combine: np.ufunc, devices: int) -> None:
        self.chain, self.combine = chain, combine
        n = chain.n
        self.f: dict[int, np.ndarray] = {}
        for d in range(devices):
            if not math.isfinite(start[d]):
                continue
            table = np.full((devices, n + 1), math.inf)
            table[d] = combine(start[d], chain.compute[d, 0, :])
            table[d, 0] = math.inf
            self.f[1 << d] = table
        for mask in range(1, 1 << devices):
            found = self.f.get(mask)
            if found is None or not np.isfinite(found).any():
                continue
            table = found
            for e in range(devices):
                if mask >> e & 1:
                    continue
                arrive = combine(table, chain.transfer[:, e, :]).min(axis=0)  # [n+1]
                best = combine(arrive[:, None], chain.compute[e]).min(axis=0)
                if not np.isfinite(best).any():
                    continue
                nxt = mask | 1 << e
                if nxt not in self.f:
                    self.f[nxt] = np.full((devices, n + 1), math.inf)
                np.minimum(self.f[nxt][e], best, out=self.f[nxt][e])

    def backtrack(self, mask: int, d: int, k: int) -> tuple[Segment, ...]:
        chain, combine = self.chain, self.combine
        steps: list[Segment] = []
        while True:
            rest = mask & ~(1 << d)
            if not rest:
                steps.append(Segment(d, 0, k))
                break
            target = float(self.f[mask][d, k])
            table = self.f[rest]
            found: tuple[int, int] | None = None
            for j in range(1, k):
                c = chain.compute[d, j, k]
                if not math.isfinite(c):
                    continue
                for p in _bits(rest):
                    value = float(combine(combine(table[p, j], chain.transfer[p, d, j]), c))
                    if value <= target * (1 + _REL) + 1e-12:
                        found = (j, p)
                        break
                if found:
                    break
            if found is None:
                raise RuntimeError(
                    "backtracking found no predecessor; the DP table is inconsistent"
                )
            j, p = found
            steps.append(Segment(d, j, k))
            mask, d, k = rest, p, j
        return tuple(reversed(steps))


class _Search:
    def __init__(self, problem: DagProblem, objective: str) -> None:
        self.problem = problem
        self.objective = objective
        self.combine: np.ufunc = np.maximum if objective == THROUGHPUT else np.add
        self.devices = problem.n_devices

    def run(self) -> DagSolution | None:
        problem, combine, devices = self.problem, self.combine, self.devices
        everything = (1 << devices) - 1
        # Each branch complete on exactly `mask`, arriving at join device e: g[b][e][mask].
        dps = [_ChainDP(b, b.inbound, combine, devices) for b in problem.branches]
        arrive: list[list[dict[int, tuple[float, int]]]] = []
        for branch, dp in zip(problem.branches, dps):
            per_e: list[dict[int, tuple[float, int]]] = []
            n = branch.n
            for e in range(devices):
                found: dict[int, tuple[float, int]] = {}
                for mask, table in dp.f.items():
                    if mask >> e & 1:
                        continue
                    values = combine(table[:, n], branch.transfer[:, e, n])
                    d = int(np.argmin(values))
                    if math.isfinite(values[d]):
                        found[mask] = (float(values[d]), d)
                per_e.append(found)
            arrive.append(per_e)
        best: tuple[float, int, tuple[int, ...], int, int, dict[int, int]] | None = None
        main_dps: dict[tuple[frozenset[int], int], _ChainDP] = {}
        for size in range(1, len(problem.branches) + 1):
            for own in itertools.combinations(range(len(problem.branches)), size):
                chain = problem.mains.get(frozenset(own))
                if chain is None:
                    continue
                assert chain.outbound is not None
                for e in range(devices):
                    if not math.isfinite(chain.inbound[e]):
                        continue
                    start = np.full(devices, math.inf)
                    start[e] = 0.0
                    main = _ChainDP(chain, start, combine, devices)
                    main_dps[(frozenset(own), e)] = main
                    spread = self._spread(own, e, arrive)
                    for mask, table in main.f.items():
                        if not mask >> e & 1:
                            continue
                        free = everything & ~mask
                        if free not in spread:
                            continue
                        ends = combine(table[:, chain.n], chain.outbound)
                        last = int(np.argmin(ends))
                        if not math.isfinite(ends[last]):
                            continue
                        value = float(
                            combine(max(float(chain.inbound[e]), spread[free][0]), ends[last])
                        )
                        if best is None or value < best[0] * (1 - _REL) - 1e-12:
                            best = (value, e, own, mask, last, spread[free][1])
        if best is None:
            return None
        value, e, own, mask, last, split = best
        main_segments = main_dps[(frozenset(own), e)].backtrack(
            mask, last, problem.mains[frozenset(own)].n
        )
        branch_segments = []
        for b in own:
            used = split[b]
            _, d = arrive[b][e][used]
            branch_segments.append(dps[b].backtrack(used, d, problem.branches[b].n))
        bottleneck, latency = evaluate_dag(problem, own, tuple(branch_segments), main_segments)
        return DagSolution(
            self.objective, own, tuple(branch_segments), main_segments, bottleneck, latency
        )

    def _spread(
        self, own: tuple[int, ...], e: int, arrive: list[list[dict[int, tuple[float, int]]]]
    ) -> dict[int, tuple[float, dict[int, int]]]:
        """For every set of free devices (e left out): the best max over the own branches
        of their arrival at e, each branch on a disjoint non-empty subset; with the subset
        each branch takes. A min-max subset convolution, branch by branch, then closed
        over supersets (a device may stay unused)."""
        everything = ((1 << self.devices) - 1) & ~(1 << e)
        table: dict[int, tuple[float, dict[int, int]]] = {0: (-math.inf, {})}
        for b in own:
            options = arrive[b][e]
            nxt: dict[int, tuple[float, dict[int, int]]] = {}
            for used, (value, split) in table.items():
                rest = everything & ~used
                for sub in _submasks(rest):
                    got = options.get(sub)
                    if got is None:
                        continue
                    total = max(value, got[0])
                    key = used | sub
                    if key not in nxt or total < nxt[key][0]:
                        nxt[key] = (total, {**split, b: sub})
            table = nxt
        # Closed over supersets: a set of free devices can leave some unused.
        closed: dict[int, tuple[float, dict[int, int]]] = {}
        for mask in range(1 << self.devices):
            if mask & ~everything:
                continue
            candidates = [table[s] for s in [0, *_submasks(mask)] if s in table]
            if candidates:
                closed[mask] = min(candidates, key=lambda item: item[0])
        return closed

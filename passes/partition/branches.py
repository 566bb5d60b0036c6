"""The branches of a model: the parts its inputs enter independently of each other before
they merge (CLIP's towers, one encoder per sensor), found from the units' data flow.

Units are taken in their pipeline order. A unit that reads no other unit starts a branch;
one that reads units of one branch joins it; the first unit that reads two branches is the
join, and it and every unit after it are the trunk. Each branch, and the chain the trunk
runs in, is then a workload of its own (`part`), with cuts that hold only what crosses
them there: a branch's last cut is what it hands to the join.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lamc.workload import Cut, CutTensor, Flow, Unit, Workload

# More branches than this: the smallest ones always run in the main chain.
MAX_BRANCHES = 4


@dataclass(frozen=True)
class ForkJoin:
    branches: tuple[tuple[int, ...], ...]  # unit indices of each branch, in order
    trunk: tuple[int, ...]  # the join and every unit after it
    # Branches too small to be worth a stage of their own (beyond MAX_BRANCHES): their units
    # always run at the head of the main chain.
    kept: tuple[int, ...] = ()

    def main_units(self, own: Iterable[int]) -> tuple[int, ...]:
        """The main chain when the branches in `own` run on their own stages: the other
        branches' units (and the kept ones), then the trunk, in pipeline order."""
        mine = set(own)
        head = sorted(u for b, units in enumerate(self.branches) if b not in mine for u in units)
        return tuple(sorted([*head, *self.kept])) + self.trunk


def fork_join(workload: Workload) -> ForkJoin | None:
    """The model's branches and trunk, or None when it is one chain (no unit reads two
    branches, or the workload does not say what flows where)."""
    if not workload.flows:
        return None
    n = len(workload.units)
    reads: list[set[int]] = [set() for _ in range(n)]
    for flow in workload.flows.values():
        if flow.producer >= 0:
            for c in flow.consumers:
                if c != flow.producer:
                    reads[c].add(flow.producer)
    branch_of: dict[int, int] = {}
    members: list[list[int]] = []
    join = None
    for u in range(n):
        sources = {branch_of[p] for p in reads[u]}
        if len(sources) >= 2:
            join = u
            break
        if sources:
            b = sources.pop()
        else:
            b = len(members)
            members.append([])
        branch_of[u] = b
        members[b].append(u)
    if join is None or len(members) < 2:
        return None
    # The largest branches (by work) may have stages of their own; the rest stay in the
    # main chain.
    flops = [sum(workload.units[u].flops for u in m) for m in members]
    ranked = sorted(range(len(members)), key=lambda b: (-flops[b], b))
    chosen = sorted(ranked[:MAX_BRANCHES])
    kept = tuple(sorted(u for b in ranked[MAX_BRANCHES:] for u in members[b]))
    return ForkJoin(tuple(tuple(members[b]) for b in chosen), tuple(range(join, n)), kept)


def part(
    workload: Workload,
    units: Sequence[int],
    *,
    arriving: Iterable[str] = (),
    hands_on: bool = True,
    name: str = "",
) -> Workload:
    """The workload of a chain of `units` (global indices, in order): cut 0 holds the model
    inputs they read and the `arriving` tensors (other branches' outputs, which then pass
    through); the last cut what leaves the chain: tensors read by units outside it
    (`hands_on`) and the model's outputs."""
    local = {u: i for i, u in enumerate(units)}
    arrived = set(arriving)
    m = len(units)
    cuts: list[list[CutTensor]] = [[] for _ in range(m + 1)]
    for flow in workload.flows.values():
        born = _birth(flow, local, arrived)
        if born is None:
            continue
        inside = [local[c] for c in flow.consumers if c in local]
        # A model input another chain also reads reaches that chain from its origin.
        outside = flow.producer >= 0 and any(
            c not in local and c != flow.producer for c in flow.consumers
        )
        leaves = flow.output or (hands_on and outside)
        death = m if leaves else max(inside, default=-1)
        for k in range(born + 1, death + 1):
            cuts[k].append(flow.tensor)
    picked = [workload.units[u] for u in units]
    renumbered = tuple(_renumber(unit, i) for i, unit in enumerate(picked))
    shared = {
        p: (size, tuple(local[u] for u in users if u in local))
        for p, (size, users) in workload.shared_params.items()
        if sum(u in local for u in users) > 1
    }
    return Workload(
        name=name or workload.name,
        binding=dict(workload.binding),
        units=renumbered,
        cuts=tuple(
            Cut(k, tuple(sorted(tensors, key=lambda t: t.name))) for k, tensors in enumerate(cuts)
        ),
        shared_params=shared,
        resident=workload.resident,
    )


def _birth(flow: Flow, local: dict[int, int], arrived: set[str]) -> int | None:
    """The local position after which the tensor is live (-1: before the first unit), or
    None when it never is in this chain."""
    if flow.producer in local:
        return local[flow.producer]
    reads = any(c in local for c in flow.consumers)
    if flow.tensor.name in arrived:
        return -1
    if flow.producer < 0 and reads:
        return -1
    return None


def _renumber(unit: Unit, index: int) -> Unit:
    from dataclasses import replace

    return replace(unit, index=index)


def inputs_read(workload: Workload, units: Iterable[int]) -> tuple[str, ...]:
    """The model inputs the units read."""
    mine = set(units)
    return tuple(
        sorted(
            name
            for name, flow in workload.flows.items()
            if flow.producer < 0 and any(c in mine for c in flow.consumers)
        )
    )


def handed(workload: Workload, units: Iterable[int]) -> tuple[str, ...]:
    """What a branch hands to the join: the tensors its units produce that a unit outside
    it reads, or that are model outputs."""
    mine = set(units)
    return tuple(
        sorted(
            name
            for name, flow in workload.flows.items()
            if flow.producer in mine and (flow.output or any(c not in mine for c in flow.consumers))
        )
    )

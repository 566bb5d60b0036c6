"""Placement constraints as masks on the partitioner's stage table, so the search stays
exact under them: pin, forbid, exclude, co-locate, forced cuts, an exact stage count.

Units are named exactly (`transformer.h.3`), by index (`#3`) or by a glob
(`transformer.h.1*`); a glob pins or forbids every unit it matches.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np

from lamc.errors import ConfigError, UsageError
from lamc.topology import Constraints, Topology
from lamc.workload import Workload


@dataclass(frozen=True)
class Constraint:
    """One constraint the user stated, resolved to unit and device indices."""

    kind: str  # stages | split_after | pin | forbid | exclude | colocate
    text: str  # as the user would write it: "pin lm_head=laptop"
    units: tuple[int, ...] = ()
    devices: tuple[int, ...] = ()
    count: int | None = None


def resolve(
    constraints: Constraints, workload: Workload, topology: Topology, *, from_file: bool = False
) -> list[Constraint]:
    error = ConfigError if from_file else UsageError
    names = topology.names()

    def device(name: str, what: str) -> int:
        if name not in names:
            raise error(f"{what}: unknown device {name!r}", hint=f"devices: {', '.join(names)}")
        return names.index(name)

    def units(pattern: str, what: str) -> tuple[int, ...]:
        found = match_units(pattern, workload)
        if not found:
            raise error(
                f"{what}: no unit matches {pattern!r}",
                hint="units are named as `lamc inspect` lists them; use #N for the N-th, or a glob",
            )
        return found

    result: list[Constraint] = []
    if constraints.stages is not None:
        if constraints.stages < 1:
            raise error(f"stages: must be at least 1, got {constraints.stages}")
        result.append(
            Constraint("stages", f"stages={constraints.stages}", count=constraints.stages)
        )
    for pattern in constraints.split_after:
        found = units(pattern, f"split-after {pattern}")
        for u in found:
            if u == len(workload.units) - 1:
                raise error(
                    f"split-after {pattern}: {workload.units[u].name} is the last unit; there is nothing after it"
                )
        result.append(Constraint("split_after", f"split-after {pattern}", units=found))
    for pattern, target in constraints.pin.items():
        text = f"pin {pattern}={target}"
        result.append(
            Constraint("pin", text, units=units(pattern, text), devices=(device(target, text),))
        )
    for pattern, targets in constraints.forbid.items():
        text = f"forbid {pattern}={','.join(targets)}"
        result.append(
            Constraint(
                "forbid",
                text,
                units=units(pattern, text),
                devices=tuple(device(t, text) for t in targets),
            )
        )
    for name in constraints.exclude:
        text = f"exclude {name}"
        result.append(Constraint("exclude", text, devices=(device(name, text),)))
    for group in constraints.colocate:
        text = f"colocate {'+'.join(group)}"
        members = tuple(sorted({u for pattern in group for u in units(pattern, text)}))
        result.append(Constraint("colocate", text, units=members))
    return result


def match_units(pattern: str, workload: Workload) -> tuple[int, ...]:
    if pattern.startswith("#") and pattern[1:].isdigit():
        index = int(pattern[1:])
        return (index,) if 0 <= index < len(workload.units) else ()
    exact = tuple(u.index for u in workload.units if u.name == pattern)
    if exact:
        return exact
    return tuple(u.index for u in workload.units if fnmatch.fnmatchcase(u.name, pattern))


def apply(compute: np.ndarray, constraints: list[Constraint]) -> tuple[np.ndarray, int | None]:
    """The stage table with every disallowed (device, j, k) set to inf, and the stage count."""
    table = compute.copy()
    d_count, size, _ = table.shape
    n = size - 1
    j_idx = np.arange(n + 1)[:, None]
    k_idx = np.arange(n + 1)[None, :]
    stages: int | None = None
    for c in constraints:
        if c.kind == "stages":
            stages = c.count
        elif c.kind == "exclude":
            for d in c.devices:
                table[d] = math.inf
        elif c.kind == "split_after":
            for u in c.units:
                cut = u + 1  # a stage may end or start at the cut but not span it
                table[:, (j_idx < cut) & (k_idx > cut)] = math.inf
        elif c.kind in ("pin", "forbid"):
            covers = np.zeros((n + 1, n + 1), dtype=bool)
            for u in c.units:
                covers |= (j_idx <= u) & (k_idx > u)
            for d in range(d_count):
                if (c.kind == "pin") != (d in c.devices):
                    table[d, covers] = math.inf
        elif c.kind == "colocate":
            first, last = min(c.units), max(c.units)
            holds_any = np.zeros((n + 1, n + 1), dtype=bool)
            for u in c.units:
                holds_any |= (j_idx <= u) & (k_idx > u)
            holds_all = (j_idx <= first) & (k_idx > last)
            table[:, holds_any & ~holds_all] = math.inf
    return table, stages

"""Placement constraints and budgets: what a topology file (or the command line) asks
of every plan, and how the file's `constraints:` and `budgets:` sections are read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lamc.topology.fields import string_list, unknown_keys
from lamc.yamlfile import LinedDict, Source, line_of, shown


@dataclass
class Constraints:
    stages: int | None = None
    split_after: tuple[str, ...] = ()
    pin: dict[str, str] = field(default_factory=dict)
    forbid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    colocate: tuple[tuple[str, ...], ...] = ()

    def merged(self, other: Constraints) -> Constraints:
        """`other` (the command line) on top of these (the topology file)."""
        return Constraints(
            stages=other.stages if other.stages is not None else self.stages,
            split_after=tuple(dict.fromkeys(self.split_after + other.split_after)),
            pin={**self.pin, **other.pin},
            forbid={**self.forbid, **other.forbid},
            exclude=tuple(dict.fromkeys(self.exclude + other.exclude)),
            colocate=self.colocate + other.colocate,
        )


@dataclass
class Budgets:
    max_latency_ms: float | None = None
    min_throughput: float | None = None  # requests per second
    min_memory_headroom: float | None = None  # fraction of each device's memory left free

    def merged(self, other: Budgets) -> Budgets:
        return Budgets(
            max_latency_ms=other.max_latency_ms
            if other.max_latency_ms is not None
            else self.max_latency_ms,
            min_throughput=other.min_throughput
            if other.min_throughput is not None
            else self.min_throughput,
            min_memory_headroom=other.min_memory_headroom
            if other.min_memory_headroom is not None
            else self.min_memory_headroom,
        )


def constraints_from(raw: Any, doc: LinedDict, source: Source, devices: set[str]) -> Constraints:
    if raw is None:
        return Constraints()
    if not isinstance(raw, LinedDict):
        raise source.error(line_of(doc, "constraints"), "constraints", "must be a mapping")
    unknown_keys(
        raw,
        {"stages", "split_after", "pin", "forbid", "exclude", "colocate"},
        "constraints",
        source,
    )
    result = Constraints()
    if "stages" in raw:
        stages = raw["stages"]
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise source.error(
                line_of(raw, "stages"),
                "constraints.stages",
                f"must be a positive integer, got {shown(stages)}",
            )
        if stages > len(devices):
            raise source.error(
                line_of(raw, "stages"),
                "constraints.stages",
                f"{shown(stages)} stages on {len(devices)} device(s): each device holds at most one",
            )
        result.stages = stages
    result.split_after = tuple(string_list(raw, "split_after", "constraints", source))
    result.exclude = tuple(string_list(raw, "exclude", "constraints", source))
    for name in result.exclude:
        if name not in devices:
            raise source.error(
                line_of(raw, "exclude"), "constraints.exclude", f"unknown device {name!r}"
            )
    for key in ("pin", "forbid"):
        table = raw.get(key)
        if table is None:
            continue
        if not isinstance(table, LinedDict):
            raise source.error(
                line_of(raw, key), f"constraints.{key}", "must map unit names to device names"
            )
        for unit, target in table.items():
            targets = [target] if isinstance(target, str) else target
            if (
                not isinstance(targets, list)
                or not targets
                or not all(isinstance(t, str) for t in targets)
            ):
                raise source.error(
                    line_of(table, unit),
                    f"constraints.{key}.{unit}",
                    "must name a device (or a list, for forbid)",
                )
            for t in targets:
                if t not in devices:
                    raise source.error(
                        line_of(table, unit), f"constraints.{key}.{unit}", f"unknown device {t!r}"
                    )
            if key == "pin":
                if len(targets) != 1:
                    raise source.error(
                        line_of(table, unit), f"constraints.pin.{unit}", "pins one device"
                    )
                result.pin[unit] = targets[0]
            else:
                result.forbid[unit] = tuple(targets)
    colocate = raw.get("colocate")
    if colocate is not None:
        if not isinstance(colocate, list) or not all(
            isinstance(g, list) and len(g) >= 2 and all(isinstance(u, str) for u in g)
            for g in colocate
        ):
            raise source.error(
                line_of(raw, "colocate"),
                "constraints.colocate",
                "must be a list of unit lists, e.g. [[embed, head]]",
            )
        result.colocate = tuple(tuple(g) for g in colocate)
    return result


def budgets_from(raw: Any, doc: LinedDict, source: Source) -> Budgets:
    if raw is None:
        return Budgets()
    if not isinstance(raw, LinedDict):
        raise source.error(line_of(doc, "budgets"), "budgets", "must be a mapping")
    unknown_keys(
        raw, {"max_latency_ms", "min_throughput", "min_memory_headroom"}, "budgets", source
    )
    budgets = Budgets()
    for key in ("max_latency_ms", "min_throughput"):
        if key in raw:
            value = raw[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value > 0
                or not math.isfinite(_as_float(value))
            ):
                raise source.error(
                    line_of(raw, key),
                    f"budgets.{key}",
                    f"must be a positive number, got {shown(value)}",
                )
            setattr(budgets, key, float(value))
    if "min_memory_headroom" in raw:
        try:
            budgets.min_memory_headroom = parse_fraction(raw["min_memory_headroom"])
        except ValueError as exc:
            raise source.error(
                line_of(raw, "min_memory_headroom"), "budgets.min_memory_headroom", str(exc)
            ) from None
    return budgets


def _as_float(value: int | float) -> float:
    """`value` as a float; integers too large for one are infinite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def parse_fraction(value: Any) -> float:
    """`10%`, `0.1` -> 0.1 (a fraction in [0, 1))."""
    if isinstance(value, bool):
        raise ValueError("must be a fraction such as 10% or 0.1")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100
        except (ValueError, OverflowError):
            raise ValueError(f"must be a fraction such as 10% or 0.1, got {value!r}") from None
    elif isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ValueError(f"must be a fraction such as 10% or 0.1, got {value!r}") from None
    else:
        raise ValueError(f"must be a fraction such as 10% or 0.1, got {value!r}")
    if not 0 <= number < 1 or math.isnan(number):
        raise ValueError(f"must be in [0%, 100%), got {value!r}")
    return number

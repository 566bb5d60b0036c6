"""A plan: the pipeline of stages the partitioner chose, with its predicted costs.

Plans are values: immutable, printable, comparable, and serialised deterministically
(sorted keys, floats rounded to 6 significant digits), so the same inputs give
byte-identical `lamc plan --json`. A plan's placement has a compact text form that parses
back (as a pipeline schedule's does):

    laptop[0:7]fp32 >raw> jetson[7:13]fp16

is two stages: units 0-6 on `laptop` in fp32, sending raw tensors to units 7-12 on
`jetson` in fp16.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Replica:
    """A member of a replicated stage (`--replicate`): it holds the whole stage and takes
    `share` of the requests (round-robin by speed)."""

    device: str
    host: str
    share: float
    compute_ms: float  # the stage's time on this member
    memory_bytes: float
    capacity_bytes: float


@dataclass(frozen=True)
class StagePlan:
    index: int
    device: str
    host: str
    kind: str
    backend: str
    start_unit: int
    end_unit: int  # exclusive
    units: tuple[str, ...]
    params_bytes: float
    activation_bytes: float
    kv_bytes: float
    runtime_bytes: float
    memory_bytes: float
    capacity_bytes: float
    compute_ms: float
    # To the next stage (or to the client after the last stage, when one is declared).
    transfer_ms: float
    transfer_bytes: float
    route: tuple[str, ...]
    precision: str = "fp32"
    precision_reason: str = ""
    codec: str = "raw"  # how this stage's outputs travel to the next ("auto": chosen at compile)
    # Branch-parallel (DAG) plans only: the stage's units (not one range of the pipeline
    # order), the stages it receives from, and the one it sends to (None: the client).
    unit_indices: tuple[int, ...] = ()
    after: tuple[int, ...] | None = None
    to: int | None = None
    # Replicated stages only: every member, this stage's own device first. compute_ms and
    # transfer_ms are then the group's periods per request (see passes.partition.replicate).
    replicas: tuple[Replica, ...] = ()

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(r.device for r in self.replicas) or (self.device,)

    @property
    def unit_set(self) -> tuple[int, ...]:
        return self.unit_indices or tuple(range(self.start_unit, self.end_unit))

    @property
    def range_text(self) -> str:
        """`[j:k]` for a range of the pipeline order, `{a:b,c:d}` for several."""
        spans: list[tuple[int, int]] = []
        for u in self.unit_set:
            if spans and spans[-1][1] == u:
                spans[-1] = (spans[-1][0], u + 1)
            else:
                spans.append((u, u + 1))
        if len(spans) == 1:
            return f"[{spans[0][0]}:{spans[0][1]}]"
        return "{" + ",".join(f"{a}:{b}" for a, b in spans) + "}"


@dataclass(frozen=True)
class Alternative:
    """A baseline evaluated under the same cost model (for comparison only)."""

    name: str
    description: str
    feasible: bool
    devices: tuple[str, ...]
    bottleneck_ms: float
    latency_ms: float
    reason: str = ""
    # Each stage's units [start, end): where the baseline cuts the model.
    unit_ranges: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class BudgetCheck:
    name: str
    limit: float
    value: float
    ok: bool
    unit: str


@dataclass(frozen=True)
class Placement:
    """One stage of a plan's placement: the part of the text form that parses back."""

    device: str
    start_unit: int
    end_unit: int  # exclusive
    precision: str = "fp32"
    codec: str = "raw"  # to the next stage

    def __str__(self) -> str:
        return f"{self.device}[{self.start_unit}:{self.end_unit}]{self.precision}"


_STAGE_TEXT = re.compile(
    r"^(?P<device>[^\s\[\]>|]+)\[(?P<start>\d+):(?P<end>\d+)\](?P<precision>[\w.-]+)$"
)


def format_placement(stages: tuple[Placement, ...]) -> str:
    """The compact text form: `dev[j:k]precision >codec> dev[k:l]precision ...`."""
    parts: list[str] = []
    for k, stage in enumerate(stages):
        if k:
            parts.append(f">{stages[k - 1].codec}>")
        parts.append(str(stage))
    return " ".join(parts)


def parse_placement(text: str) -> tuple[Placement, ...]:
    """The inverse of `format_placement`; a malformed text raises ValueError naming the
    token that is wrong."""
    tokens = text.split()
    if not tokens or len(tokens) % 2 == 0:
        raise ValueError(f"plan text {text!r}: expected STAGE (>CODEC> STAGE)*")
    stages: list[Placement] = []
    codecs = [t[1:-1] for t in tokens[1::2]]
    for k, token in enumerate(tokens[0::2]):
        match = _STAGE_TEXT.match(token)
        if match is None:
            raise ValueError(f"plan text: stage {k} {token!r} is not DEVICE[START:END]PRECISION")
        stages.append(
            Placement(
                match["device"],
                int(match["start"]),
                int(match["end"]),
                match["precision"],
                codecs[k] if k < len(codecs) else "raw",
            )
        )
    for k, link in enumerate(tokens[1::2]):
        if not (link.startswith(">") and link.endswith(">") and len(link) > 2):
            raise ValueError(f"plan text: link {k} {link!r} is not >CODEC>")
    for a, b in itertools.pairwise(stages):
        if a.end_unit != b.start_unit:
            raise ValueError(f"plan text: {a} and {b} do not meet (units must be contiguous)")
    if any(s.end_unit <= s.start_unit for s in stages):
        raise ValueError(f"plan text {text!r}: a stage holds no unit")
    return tuple(stages)


@dataclass(frozen=True)
class Plan:
    model: str
    topology: str
    objective: str
    binding: dict[str, int]
    stages: tuple[StagePlan, ...]
    bottleneck_ms: float
    latency_ms: float
    inbound_ms: float
    fluid_bound_ms: float
    best_by_stages: dict[int, float] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    alternatives: tuple[Alternative, ...] = ()
    budgets: tuple[BudgetCheck, ...] = ()
    constraints: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # Units kept off a device because its backend cannot run them, with the reason.
    support: tuple[str, ...] = ()
    # How the partitioner searched: exact, exact over classes of identical devices, or a
    # beam search (approximate) where the exact table would not fit its memory budget.
    search: str = "exact"
    # Objective generate: prefill ms, decode ms per token, their total over new_tokens,
    # and why the plan has as many stages as it has.
    generation: dict[str, Any] = field(default_factory=dict)
    # Bytes of input that cross a link to reach the first stage (from the client, or
    # from where each input originates).
    inbound_bytes: float = 0.0
    # Branch-parallel plans: the join stage, where the branches' stages hand their outputs.
    join: int | None = None

    @property
    def link_bytes(self) -> float:
        """All the bytes one request moves over links: its inputs in, between the stages,
        and its outputs out."""
        return self.inbound_bytes + sum(s.transfer_bytes for s in self.stages)

    @property
    def is_dag(self) -> bool:
        """Branch-parallel: some stage receives from several stages, or from none but
        is not the first."""
        return any(s.after is not None for s in self.stages)

    def successor(self, index: int) -> int | None:
        """The stage that stage `index` sends to (None: the client)."""
        stage = self.stages[index]
        if stage.after is not None:
            return stage.to
        return index + 1 if index + 1 < len(self.stages) else None

    @property
    def replicated(self) -> bool:
        return any(s.replicas for s in self.stages)

    @property
    def devices_used(self) -> set[str]:
        return {d for s in self.stages for d in s.devices}

    @property
    def placement(self) -> tuple[Placement, ...]:
        return tuple(
            Placement(s.device, s.start_unit, s.end_unit, s.precision, s.codec) for s in self.stages
        )

    @property
    def text(self) -> str:
        """The placement in its compact text form (see `parse_placement`). A DAG plan's
        text shows its branches side by side, `(a[0:4]fp32 >raw> b[4:9]fp32 & c{9:12}fp32)
        >raw> d[12:14]fp32`; it is for reading, and does not parse back."""
        if self.replicated:  # `a|b[0:4]fp32`: a stage served by a and b (for reading)
            return format_placement(
                tuple(
                    replace(p, device="|".join(s.devices))
                    for p, s in zip(self.placement, self.stages, strict=True)
                )
            )
        if not self.is_dag:
            return format_placement(self.placement)
        assert self.join is not None
        join = self.stages[self.join]
        arms = []
        for first in (s for s in self.stages if s.after == () and s.index < join.index):
            parts, k = [], first.index
            while k != join.index:
                stage = self.stages[k]
                parts.append(f"{stage.device}{stage.range_text}{stage.precision}")
                parts.append(f">{stage.codec}>")
                assert stage.to is not None
                k = stage.to
            arms.append(" ".join(parts[:-1]))
        rest, k = [], join.index
        while True:
            stage = self.stages[k]
            rest.append(f"{stage.device}{stage.range_text}{stage.precision}")
            nxt = stage.to
            if nxt is None:
                break
            rest.append(f">{stage.codec}>")
            k = nxt
        codec = self.stages[join.after[0]].codec if join.after else "raw"
        return f"({' & '.join(arms)}) >{codec}> " + " ".join(rest)

    @property
    def throughput_rps(self) -> float:
        return 1000.0 / self.bottleneck_ms if self.bottleneck_ms > 0 else math.inf

    @property
    def fluid_ratio(self) -> float:
        """How far the plan's bottleneck is above the fluid bound (1.0 = at the bound)."""
        return self.bottleneck_ms / self.fluid_bound_ms if self.fluid_bound_ms > 0 else math.inf

    @property
    def bottleneck(self) -> str:
        """Which stage or link limits throughput."""
        worst = max(
            [
                (s.compute_ms, f"stage {s.index} compute on {'|'.join(s.devices)}")
                for s in self.stages
            ]
            + [
                (
                    s.transfer_ms,
                    f"link {'|'.join(s.devices)} -> {'|'.join(self.stages[nxt].devices)}"
                    if nxt is not None
                    else f"{'|'.join(s.devices)} -> client",
                )
                for s in self.stages
                for nxt in [self.successor(s.index)]
            ]
            + [(self.inbound_ms, "client -> first stage")]
        )
        return worst[1]

    @property
    def headroom(self) -> float:
        """The smallest fraction of a used device's memory the plan leaves free."""
        held = [(s.capacity_bytes, s.memory_bytes) for s in self.stages] + [
            (r.capacity_bytes, r.memory_bytes) for s in self.stages for r in s.replicas
        ]
        return min(((c - m) / c for c, m in held), default=1.0)

    @property
    def budgets_ok(self) -> bool:
        return all(b.ok for b in self.budgets)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["throughput_rps"] = self.throughput_rps
        data["fluid_ratio"] = self.fluid_ratio
        data["limited_by"] = self.bottleneck
        data["best_by_stages"] = {str(k): v for k, v in sorted(self.best_by_stages.items())}
        data["text"] = self.text
        data["headroom"] = self.headroom
        return rounded(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def rounded(value: Any) -> Any:
    """JSON-ready `value`: floats to 6 significant digits (inf and nan as null)."""
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return None
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value

"""A plan: the pipeline of stages the partitioner chose, with its predicted costs.

Plans are data first: printable, comparable, and serialised deterministically (sorted
keys, floats rounded to 6 significant digits), so the same inputs give byte-identical
`lamc plan --json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class BudgetCheck:
    name: str
    limit: float
    value: float
    ok: bool
    unit: str


@dataclass
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
    # Objective generate: prefill ms, decode ms per token, their total over new_tokens,
    # and why the plan has as many stages as it has.
    generation: dict[str, Any] = field(default_factory=dict)

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
            [(s.compute_ms, f"stage {s.index} compute on {s.device}") for s in self.stages]
            + [
                (
                    s.transfer_ms,
                    f"link {s.device} -> {self.stages[s.index + 1].device}"
                    if s.index + 1 < len(self.stages)
                    else f"{s.device} -> client",
                )
                for s in self.stages
            ]
            + [(self.inbound_ms, "client -> first stage")]
        )
        return worst[1]

    @property
    def budgets_ok(self) -> bool:
        return all(b.ok for b in self.budgets)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["throughput_rps"] = self.throughput_rps
        data["fluid_ratio"] = self.fluid_ratio
        data["limited_by"] = self.bottleneck
        data["best_by_stages"] = {str(k): v for k, v in sorted(self.best_by_stages.items())}
        return _rounded(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return None
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value

"""The workload the partitioner sees: the model's units in pipeline order and the cuts
between them. Plain data, derived from the analysed IR by `lamc.passes.units`.

Cut k is the boundary before unit k: the tensors that are live across it (produced at or
before unit k-1, or a model input, and used at or after unit k, or a model output).
Cut 0 holds the model inputs, cut n the model outputs. A stage covering units [j, k)
receives cut j and sends cut k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OpWork:
    """One operator's work: its class (for device efficiency), FLOPs and bytes moved."""

    op_class: str
    flops: float
    moved_bytes: float
    dtype: str = "fp32"
    # Of moved_bytes, the weights read (streamed from memory); the rest are activations.
    weight_bytes: float = 0.0


@dataclass(frozen=True)
class Unit:
    index: int
    name: str
    kind: str  # "block" (a repeated module) or "glue" (what lies between blocks)
    module_class: str | None
    nodes: int
    flops: float
    matrix_flops: float
    param_bytes: int
    peak_activation_bytes: int
    ops: tuple[OpWork, ...]
    params: tuple[str, ...]
    # KV-cache bytes per token of context (per sequence) this unit owns; 0 without a cache.
    kv_bytes_per_token: int = 0


@dataclass(frozen=True)
class CutTensor:
    name: str
    dtype: str
    shape: tuple[int | str, ...]
    bytes: int


@dataclass(frozen=True)
class Cut:
    index: int
    tensors: tuple[CutTensor, ...]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)


@dataclass(frozen=True)
class Flow:
    """Where one tensor comes from and goes: its producer unit (-1: a model input), the
    units that consume it, and whether it is a model output. What the branch-parallel
    planner needs to cut the model into branches with their own cuts."""

    tensor: CutTensor
    producer: int
    consumers: tuple[int, ...]
    output: bool = False


@dataclass
class Workload:
    name: str
    binding: dict[str, int]
    units: tuple[Unit, ...]
    cuts: tuple[Cut, ...]
    # Initializers used by more than one unit (tied weights): name -> (bytes, unit indices).
    shared_params: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    # Unit DAG edges: (producer unit, consumer unit) -> bytes.
    edges: dict[tuple[int, int], int] = field(default_factory=dict)
    # Tensors that stay on their stage and never cross a link (a decoder's KV caches):
    # listed in the cuts, not charged to transfers.
    resident: frozenset[str] = frozenset()
    # Every tensor's producer and consumers (empty for hand-built workloads, which then
    # plan as chains only).
    flows: dict[str, Flow] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.cuts) != len(self.units) + 1:
            raise ValueError(
                f"{len(self.units)} units need {len(self.units) + 1} cuts, got {len(self.cuts)}"
            )

    @property
    def flops(self) -> float:
        return sum(u.flops for u in self.units)

    @property
    def param_bytes(self) -> int:
        """Unique parameter bytes (tied weights counted once)."""
        total = sum(u.param_bytes for u in self.units)
        for size, users in self.shared_params.values():
            total -= size * (len(users) - 1)
        return total

    def unit_index(self, name: str) -> int:
        for unit in self.units:
            if unit.name == name:
                return unit.index
        raise KeyError(name)

    def dag(self) -> Any:
        """The unit DAG as a networkx DiGraph with `bytes` on each edge."""
        import networkx as nx

        graph = nx.DiGraph()
        for unit in self.units:
            graph.add_node(unit.index, name=unit.name)
        for (a, b), size in sorted(self.edges.items()):
            graph.add_edge(a, b, bytes=size)
        return graph

    def summary(self) -> dict[str, Any]:
        """A JSON-able table of units (no per-op detail)."""
        return {
            "model": self.name,
            "binding": dict(sorted(self.binding.items())),
            "units": [
                {
                    "index": u.index,
                    "name": u.name,
                    "kind": u.kind,
                    "class": u.module_class,
                    "nodes": u.nodes,
                    "flops": u.flops,
                    "matrix_flops": u.matrix_flops,
                    "param_bytes": u.param_bytes,
                    "peak_activation_bytes": u.peak_activation_bytes,
                    "cut_bytes_after": self.cuts[u.index + 1].bytes,
                }
                for u in self.units
            ],
            "totals": {
                "flops": self.flops,
                "matrix_flops": sum(u.matrix_flops for u in self.units),
                "param_bytes": self.param_bytes,
                "input_bytes": self.cuts[0].bytes,
                "output_bytes": self.cuts[-1].bytes,
            },
        }

"""A measured device: what `lamc profile` found, before it becomes a topology entry."""

from __future__ import annotations

from dataclasses import dataclass, field

from lamc.profile.probes import Probe


@dataclass
class DeviceProfile:
    name: str
    host: str
    kind: str
    memory_bytes: float
    peak_flops: dict[str, float]
    memory_bandwidth: float
    cache_bytes: float
    cache_bandwidth: float
    efficiency: dict[str, dict[str, float]]
    class_overhead_ms: dict[str, float]
    op_overhead_ms: float
    call_overhead_ms: float
    providers: list[str]
    threads: int
    probes: list[Probe] = field(default_factory=list)
    # The fraction of the probes' (best-round) speed this process sustains: a CPU quota's
    # share times what lasts of a GEMM run back to back. Rates and overheads are scaled.
    cpu_share: float = 1.0
    sustained: float = 1.0  # of that, what lasted of the GEMM's burst speed
    # One side of a tensor message between stages (encode or decode, checks included).
    serialize_overhead_ms: float = 0.0
    serialize_bandwidth: float = 0.0
    # A training stage process before its model (0: not measured, no torch here).
    training_runtime_memory_bytes: float = 0.0

    def to_yaml(self) -> str:
        """A device entry that a topology can `include:`."""
        from lamc.profile.writer import device_yaml

        return device_yaml(self)

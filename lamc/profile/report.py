"""A profile as rows of text for the terminal."""

from __future__ import annotations

import math

from lamc.profile.model import DeviceProfile
from lamc.quantity import format_bytes


def describe(profile: DeviceProfile) -> list[str]:
    rows = [f"{'probe':36} {'class':12} {'dtype':6} {'ms':>9} {'GFLOP/s':>9} {'GB/s':>8}"]
    for p in profile.probes:
        rows.append(
            f"{p.name:36} {p.op_class:12} {p.dtype:6} {p.seconds * 1000:9.3f} {p.flops / p.seconds / 1e9:9.1f} {p.moved_bytes / p.seconds / 1e9:8.2f}"
        )
    peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in profile.peak_flops.items())
    rows.append(
        f"peak: {peaks}; memory bandwidth {profile.memory_bandwidth / 1e9:.2f} GB/s; memory {format_bytes(profile.memory_bytes)}"
    )
    if profile.cache_bytes:
        rows.append(
            f"cache: {format_bytes(profile.cache_bytes)} at {profile.cache_bandwidth / 1e9:.2f} GB/s"
        )
    rows.append(
        f"overhead: {profile.call_overhead_ms * 1000:.1f} us per call, {profile.op_overhead_ms * 1000:.2f} us per op; by class: "
        + ", ".join(f"{k} {v * 1000:.1f} us" for k, v in profile.class_overhead_ms.items())
    )
    for dtype, table in profile.efficiency.items():
        rows.append(f"efficiency {dtype}: " + ", ".join(f"{k} {v:.2f}" for k, v in table.items()))
    if profile.cpu_share < 0.995:
        rows.append(
            f"sustained: this process keeps {profile.cpu_share:.2f} of the probes' best speed "
            f"({profile.sustained:.2f} of it lasted in a GEMM run back to back, the rest is "
            "the CPU quota); rates and overheads above are scaled to it"
        )
    if profile.serialize_bandwidth:
        rows.append(
            f"messages between stages: {profile.serialize_overhead_ms * 1000:.0f} us + "
            f"{profile.serialize_bandwidth / 1e9:.2f} GB/s on each side"
        )
    if not math.isfinite(profile.memory_bandwidth):
        rows.append("warning: memory bandwidth could not be measured")
    return rows

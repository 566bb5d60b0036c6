"""A measured device as a topology entry (YAML a topology can `include:`)."""

from __future__ import annotations

import math
import os
import platform

from lamc.profile.model import DeviceProfile


def device_yaml(self: DeviceProfile) -> str:
    """A device entry that a topology can `include:`."""
    lines = [
        "# A device measured by `lamc profile` with ONNX Runtime",
        f"# ({platform.machine()}, {os.cpu_count()} CPUs, providers {', '.join(self.providers)}, {self.threads or 'default'} threads).",
        "# Include it from a topology:  devices: [{include: this-file.yaml, name: NAME, host: HOST}]",
        *(
            [
                f"# Rates and overheads scaled to {self.cpu_share:.2f} of the probes' best speed "
                f"(sustained {self.sustained:.2f}, times the CPU quota's share)."
            ]
            if self.cpu_share < 0.995
            else []
        ),
        "lamc_device: 1",
        f"name: {self.name}",
        f"host: {self.host}",
        f"kind: {self.kind}",
        f"memory: {self.memory_bytes / 2**30:.2f}GiB",
        f"memory_bandwidth: {self.memory_bandwidth / 1e9:.2f}GB/s",
    ]
    if self.cache_bytes:
        lines.append(
            f"cache: {{size: {self.cache_bytes / 2**20:.0f}MiB, bandwidth: {self.cache_bandwidth / 1e9:.2f}GB/s}}"
        )
    lines += ["peak:"]
    for dtype, rate in self.peak_flops.items():
        lines.append(f"  {dtype}: {rate / 1e9:.1f}GFLOPS")
    lines.append("efficiency:")
    for dtype, table in self.efficiency.items():
        entries = ", ".join(f"{k}: {v:.3f}" for k, v in table.items())
        lines.append(f"  {dtype}: {{{entries}}}")
    overheads = ", ".join(
        [f"default: {self.op_overhead_ms * 1000:.2f}us"]
        + [f"{k}: {v * 1000:.2f}us" for k, v in self.class_overhead_ms.items()]
    )
    if self.serialize_bandwidth:
        lines.append(
            f"serialize: {{overhead: {self.serialize_overhead_ms * 1000:.2f}us, "
            f"bandwidth: {self.serialize_bandwidth / 1e9:.2f}GB/s}}"
        )
    if self.training_runtime_memory_bytes:
        mib = math.ceil(self.training_runtime_memory_bytes / 2**20)
        lines.append(f"training_runtime_memory: {mib}MiB")
    lines += [
        f"op_overhead: {{{overheads}}}",
        f"call_overhead: {self.call_overhead_ms * 1000:.2f}us",
        "backends: [onnxruntime]"
        if self.kind == "cpu"
        else "backends: [onnxruntime-cuda, onnxruntime]",
    ]
    return "\n".join(lines) + "\n"

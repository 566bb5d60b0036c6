"""One `devices:` entry of a topology (or a device file written by `lamc profile`)."""

from __future__ import annotations

import math
from pathlib import Path

from lamc.quantity import parse_bandwidth, parse_bytes, parse_duration_ms, parse_flops
from lamc.topology.fields import quantity, string, unknown_keys
from lamc.topology.model import (
    BACKENDS,
    DEFAULT_OVERHEAD_MS,
    DEFAULT_RUNTIME_MEMORY,
    DTYPES,
    KINDS,
    OP_CLASSES,
    Device,
)
from lamc.yamlfile import LinedDict, LinedList, Source, line_of, load_yaml

DEVICE_KEYS = {
    "name",
    "host",
    "kind",
    "memory",
    "peak",
    "memory_bandwidth",
    "backends",
    "efficiency",
    "op_overhead",
    "call_overhead",
    "runtime_memory",
    "training_runtime_memory",
    "training_schedule_overhead",
    "include",
    "lamc_device",
    "cache",
    "time_scale",
    "serialize",
}


def device_from(entry: LinedDict, where: str, source: Source, base: Path) -> Device:
    unknown_keys(entry, DEVICE_KEYS, where, source)
    merged = entry
    if "include" in entry:
        include = string(entry["include"], source, entry, f"{where}.include")
        target = (base / include).resolve()
        included, inc_source = load_yaml(target)
        if not isinstance(included, LinedDict):
            raise source.error(
                line_of(entry, "include"),
                f"{where}.include",
                f"{include} does not hold a device mapping",
            )
        unknown_keys(included, DEVICE_KEYS, "(included device)", inc_source)
        merged = LinedDict(entry.line)
        for src in (included, entry):
            for key, value in src.items():
                if key == "include":
                    continue
                merged[key] = value
                merged.lines[key] = (
                    src.lines.get(key, src.line)
                    if src is entry
                    else entry.lines.get("include", entry.line)
                )
    name = string(
        merged.get("name"), source, merged, f"{where}.name", required="name" not in merged
    )
    host = string(merged.get("host", name), source, merged, f"{where}.host")
    kind = string(
        merged.get("kind"), source, merged, f"{where}.kind", required="kind" not in merged
    )
    if kind not in KINDS:
        raise source.error(
            line_of(merged, "kind"),
            f"{where}.kind",
            f"must be one of {', '.join(KINDS)}, got {kind!r}",
        )
    memory = quantity(merged, "memory", where, source, parse_bytes, positive=True)
    bandwidth = quantity(merged, "memory_bandwidth", where, source, parse_bandwidth, positive=True)

    peak_raw = merged.get("peak")
    if not isinstance(peak_raw, LinedDict) or not peak_raw:
        raise source.error(
            line_of(merged, "peak"),
            f"{where}.peak",
            "must map dtypes to peak rates, e.g. {fp32: 1TFLOPS}",
        )
    peak: dict[str, float] = {}
    for dtype in peak_raw:
        if dtype not in DTYPES:
            raise source.error(
                line_of(peak_raw, dtype),
                f"{where}.peak.{dtype}",
                f"unknown dtype (use {', '.join(DTYPES)})",
            )
        peak[dtype] = quantity(peak_raw, dtype, f"{where}.peak", source, parse_flops, positive=True)

    backends_raw = merged.get("backends", ["onnxruntime"])
    if not isinstance(backends_raw, list) or not backends_raw:
        raise source.error(
            line_of(merged, "backends"), f"{where}.backends", "must be a non-empty list"
        )
    backends: list[str] = []
    for i, b in enumerate(backends_raw):
        if not isinstance(b, str) or b not in BACKENDS:
            raise source.error(
                line_of(backends_raw, i)
                if isinstance(backends_raw, LinedList)
                else line_of(merged, "backends"),
                f"{where}.backends[{i}]",
                f"unknown backend {b!r}",
                hint=f"known backends: {', '.join(BACKENDS)}",
            )
        if b in backends:
            raise source.error(
                line_of(merged, "backends"), f"{where}.backends", f"{b!r} listed twice"
            )
        backends.append(b)

    efficiency: dict[str, dict[str, float]] = {}
    eff_raw = merged.get("efficiency")
    if eff_raw is not None:
        if not isinstance(eff_raw, LinedDict):
            raise source.error(
                line_of(merged, "efficiency"),
                f"{where}.efficiency",
                "must map dtypes to {op class: fraction}",
            )
        for dtype, table in eff_raw.items():
            field_name = f"{where}.efficiency.{dtype}"
            if dtype not in DTYPES:
                raise source.error(
                    line_of(eff_raw, dtype), field_name, f"unknown dtype (use {', '.join(DTYPES)})"
                )
            if not isinstance(table, LinedDict):
                raise source.error(
                    line_of(eff_raw, dtype), field_name, "must map op classes to fractions"
                )
            efficiency[dtype] = {}
            for op_class, value in table.items():
                if op_class not in OP_CLASSES:
                    raise source.error(
                        line_of(table, op_class),
                        f"{field_name}.{op_class}",
                        f"unknown op class (use {', '.join(OP_CLASSES)})",
                    )
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not 0 < value <= 1
                    or math.isnan(value)
                ):
                    raise source.error(
                        line_of(table, op_class),
                        f"{field_name}.{op_class}",
                        f"must be a fraction in (0, 1], got {value!r}",
                    )
                efficiency[dtype][op_class] = float(value)

    op_overhead, call_overhead = DEFAULT_OVERHEAD_MS[kind]
    class_overhead: dict[str, float] = {}
    if "op_overhead" in merged:
        raw = merged["op_overhead"]
        if isinstance(raw, LinedDict):
            for op_class in raw:
                if op_class != "default" and op_class not in OP_CLASSES:
                    raise source.error(
                        line_of(raw, op_class),
                        f"{where}.op_overhead.{op_class}",
                        f"unknown op class (use default, {', '.join(OP_CLASSES)})",
                    )
                value = quantity(
                    raw, op_class, f"{where}.op_overhead", source, parse_duration_ms, positive=False
                )
                if op_class == "default":
                    op_overhead = value
                else:
                    class_overhead[op_class] = value
        else:
            op_overhead = quantity(
                merged, "op_overhead", where, source, parse_duration_ms, positive=False
            )
    if "call_overhead" in merged:
        call_overhead = quantity(
            merged, "call_overhead", where, source, parse_duration_ms, positive=False
        )
    runtime_memory = float(DEFAULT_RUNTIME_MEMORY[kind])
    if "runtime_memory" in merged:
        runtime_memory = quantity(
            merged, "runtime_memory", where, source, parse_bytes, positive=False
        )
    training_runtime = 0.0
    if "training_runtime_memory" in merged:
        training_runtime = quantity(
            merged, "training_runtime_memory", where, source, parse_bytes, positive=True
        )
    schedule_overhead = 0.0
    if "training_schedule_overhead" in merged:
        schedule_overhead = quantity(
            merged, "training_schedule_overhead", where, source, parse_duration_ms, positive=False
        )
    cache_bytes = cache_bandwidth = 0.0
    if "cache" in merged:
        cache = _sub_mapping(merged, "cache", "{size: 32MiB, bandwidth: 100GB/s}", where, source)
        cache_bytes = quantity(cache, "size", f"{where}.cache", source, parse_bytes, positive=True)
        cache_bandwidth = quantity(
            cache, "bandwidth", f"{where}.cache", source, parse_bandwidth, positive=True
        )
    serialize_overhead = serialize_bandwidth = 0.0
    if "serialize" in merged:
        entry_s = _sub_mapping(
            merged, "serialize", "{overhead: 0.1ms, bandwidth: 2GB/s}", where, source
        )
        if "overhead" in entry_s:
            serialize_overhead = quantity(
                entry_s, "overhead", f"{where}.serialize", source, parse_duration_ms, positive=False
            )
        if "bandwidth" in entry_s:
            serialize_bandwidth = quantity(
                entry_s, "bandwidth", f"{where}.serialize", source, parse_bandwidth, positive=True
            )
    scale = 1.0
    if "time_scale" in merged:
        raw_scale = merged["time_scale"]
        if (
            isinstance(raw_scale, bool)
            or not isinstance(raw_scale, (int, float))
            or not math.isfinite(raw_scale)
            or raw_scale <= 0
        ):
            raise source.error(
                line_of(merged, "time_scale"),
                f"{where}.time_scale",
                f"must be a positive number (measured time / predicted time), got {raw_scale!r}",
            )
        scale = float(raw_scale)
    if runtime_memory >= memory:
        raise source.error(
            line_of(merged, "memory"),
            f"{where}.memory",
            f"{memory:.0f} bytes leaves nothing after the runtime's own {runtime_memory:.0f}",
        )
    # `time_scale` (written by `lamc bench --calibrate`): every time on this device is that
    # many times what its rates and overheads say, so rates are divided by it.
    return Device(
        name=name,
        host=host,
        kind=kind,
        memory_bytes=memory,
        peak_flops={dtype: rate / scale for dtype, rate in peak.items()},
        memory_bandwidth=bandwidth / scale,
        backends=tuple(backends),
        efficiency=efficiency,
        op_overhead_ms=op_overhead * scale,
        call_overhead_ms=call_overhead * scale,
        runtime_memory_bytes=runtime_memory,
        training_runtime_memory_bytes=training_runtime,
        training_schedule_overhead_ms=schedule_overhead * scale,
        line=entry.line,
        cache_bytes=cache_bytes,
        cache_bandwidth=cache_bandwidth / scale,
        class_overhead_ms={k: v * scale for k, v in class_overhead.items()},
        time_scale=scale,
        serialize_overhead_ms=serialize_overhead * scale,
        serialize_bandwidth=serialize_bandwidth / scale,
    )


def _sub_mapping(
    merged: LinedDict, key: str, example: str, where: str, source: Source
) -> LinedDict:
    """`merged[key]`, which must be a mapping of the keys `example` shows, and no others."""
    entry = merged[key]
    if not isinstance(entry, LinedDict):
        raise source.error(line_of(merged, key), f"{where}.{key}", f"must be a mapping {example}")
    allowed = {part.split(":")[0].strip(" {") for part in example.split(",")}
    unknown_keys(entry, allowed, f"{where}.{key}", source)
    return entry

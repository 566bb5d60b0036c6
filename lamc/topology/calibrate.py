"""`lamc bench OUT --calibrate T.yaml`: a topology corrected by measurement.

Each device that ran a stage gets `time_scale`, the median over its stages of measured
time / predicted time (times its old `time_scale`): its rates are divided by it and its
overheads multiplied, so a plan made with the written topology predicts what was
measured. Devices that ran nothing keep their entries unchanged. Comments and layout of
the source file are not kept; relative `include:` paths are made absolute when the
calibrated file is written elsewhere.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamc.errors import UsageError


@dataclass(frozen=True)
class DeviceCalibration:
    device: str
    stages: tuple[int, ...]
    ratio: float  # median measured / predicted over its stages
    time_scale: float  # the new time_scale (old one times the ratio)


def device_ratios(
    rows: Sequence[Mapping[str, Any]], old_scales: Mapping[str, float]
) -> list[DeviceCalibration]:
    """Per device: the median of measured p50 / predicted over the stages it ran."""
    by_device: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        measured = row.get("measured_ms")
        predicted = float(row.get("predicted_compute_ms") or 0.0)
        if not measured or predicted <= 0:
            continue
        by_device.setdefault(row["device"], []).append(
            (int(row["stage"]), float(measured["p50"]) / predicted)
        )
    result = []
    for device, entries in by_device.items():
        ratio = statistics.median(r for _, r in entries)
        result.append(
            DeviceCalibration(
                device,
                tuple(k for k, _ in entries),
                ratio,
                old_scales.get(device, 1.0) * ratio,
            )
        )
    return result


def write_calibrated(
    source: Path,
    expected_sha256: str,
    calibrations: Sequence[DeviceCalibration],
    target: Path,
    note: str,
) -> None:
    """Write `source` with each calibrated device's `time_scale` to `target` (atomically).
    `source` must be the topology the pipeline was compiled for (its sha256)."""
    import yaml

    from lamc.atomic import replace_file

    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise UsageError(
            f"--calibrate {source}: not the topology this pipeline was compiled for "
            "(its sha256 differs from the manifest's)"
        )
    document = yaml.safe_load(data)
    devices = document.get("devices") if isinstance(document, dict) else None
    if not isinstance(devices, list):
        raise UsageError(f"--calibrate {source}: no devices list")
    wanted = {c.device: c for c in calibrations}
    moved = source.parent.resolve() != target.parent.resolve()
    for entry in devices:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name")
        include = entry.get("include")
        if isinstance(include, str) and moved and not Path(include).is_absolute():
            entry["include"] = str((source.parent / include).resolve())
        if name is None and isinstance(include, str):
            included = yaml.safe_load((source.parent / include).read_text())
            name = included.get("name") if isinstance(included, dict) else None
        if name in wanted:
            entry["time_scale"] = round(wanted[name].time_scale, 4)
    header = "".join(f"# {line}\n" for line in note.splitlines())
    text = header + yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)
    replace_file(target, lambda tmp: tmp.write_text(text))

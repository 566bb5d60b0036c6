"""`lamc diff A B`: what differs between two plans (`lamc plan --json` output) or two
compiled pipelines (OUT directories or their manifest.json): stages, devices, units,
precisions, codecs, predicted costs, hashes. Exit 0 when they are the same, 1 when they
differ (as `diff` does), 2 when either is not a plan or a pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from lamc.cli.main import CommandOutcome, cli, lamc_command
from lamc.errors import UsageError

# What a reviewer compares, per kind; everything else (timestamps, versions, the long
# explanations) is left out.
_PLAN_TOP = (
    "model",
    "topology",
    "objective",
    "latency_ms",
    "throughput_rps",
    "bottleneck_ms",
    "limited_by",
)
_PLAN_STAGE = (
    "device", "host", "kind", "backend", "precision", "codec", "units", "compute_ms",
    "transfer_ms", "memory_bytes", "route",
)  # fmt: skip
_MANIFEST_STAGE = (
    "device", "host", "kind", "backend", "providers", "precision", "units", "predicted",
)  # fmt: skip


def _load(path: Path) -> tuple[str, dict[str, Any]]:
    """("plan" | "pipeline", its comparable content)."""
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path}: no such plan file or compiled pipeline")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: not JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise UsageError(f"{file}: neither a plan (lamc plan --json) nor a pipeline manifest")
    if "lamc_manifest" in data:
        return "pipeline", _pipeline(data)
    return "plan", _plan(data)


def _plan(data: dict[str, Any]) -> dict[str, Any]:
    out = {key: data.get(key) for key in _PLAN_TOP if key in data}
    out["stages"] = [
        {key: stage.get(key) for key in _PLAN_STAGE if key in stage}
        for stage in data["stages"]
        if isinstance(stage, dict)
    ]
    return out


def _pipeline(data: dict[str, Any]) -> dict[str, Any]:
    out = _pipeline_plan(data)
    out["model"] = {
        k: data.get("model", {}).get(k) for k in ("name", "source", "sha256", "adapter")
    }
    out["topology"] = data.get("topology")
    # Failover pipelines, by the devices they do without.
    out["failover"] = {
        ",".join(sorted(f.get("lost", []))): _pipeline_plan(f)
        for f in data.get("failover") or []
        if isinstance(f, dict)
    }
    return out


def _pipeline_plan(data: dict[str, Any]) -> dict[str, Any]:
    plan = data.get("plan") or {}
    stages = []
    for stage in data.get("stages", []):
        entry = {key: stage.get(key) for key in _MANIFEST_STAGE if key in stage}
        entry["files"] = {f.get("path"): f.get("sha256") for f in stage.get("files", [])}
        stages.append(entry)
    return {
        "plan": {
            k: plan.get(k)
            for k in ("objective", "latency_ms", "throughput_rps", "bottleneck_ms", "limited_by")
        },
        "stages": stages,
        "edges": [
            {
                "from": edge.get("source"),
                "to": edge.get("target"),
                "bytes": edge.get("bytes"),
                "codecs": {t.get("name"): t.get("codec") for t in edge.get("tensors", [])},
            }
            for edge in data.get("edges", [])
        ],
    }


def _same(a: Any, b: Any, rtol: float) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
    return bool(a == b)


def _structured(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
    )


def differences(a: Any, b: Any, rtol: float = 0.0) -> list[dict[str, Any]]:
    """Each place where `a` and `b` differ, in document order: a value changed, or a part
    (a stage, a failover pipeline) only one side has, named once."""
    found: list[dict[str, Any]] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            pairs = [
                (k, x.get(k, _MISSING), y.get(k, _MISSING))
                for k in [*x, *(k for k in y if k not in x)]
            ]
        elif isinstance(x, list) and isinstance(y, list) and (_structured(x) or _structured(y)):
            pairs = [
                (i, x[i] if i < len(x) else _MISSING, y[i] if i < len(y) else _MISSING)
                for i in range(max(len(x), len(y)))
            ]
        else:
            if not _same(x, y, rtol):
                found.append({"path": path, "a": x, "b": y, "change": "changed"})
            return
        for key, left, right in pairs:
            where = f"{path}/{key}" if path else str(key)
            if right is _MISSING:
                found.append({"path": where, "a": left, "b": None, "change": "only in A"})
            elif left is _MISSING:
                found.append({"path": where, "a": None, "b": right, "change": "only in B"})
            else:
                walk(left, right, where)

    walk(a, b, "")
    return found


_MISSING = object()


def _short(value: Any, width: int = 32) -> str:
    if isinstance(value, dict) and "device" in value:
        units = value.get("units") or []
        span = f" {units[0]} .. {units[-1]}" if len(units) > 1 else f" {units[0]}" if units else ""
        return _short(f"{value['device']}{span}", width)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0] if len(value) == 1 else f"{value[0]} .. {value[-1]} ({len(value)})"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@cli.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Numbers within this relative difference count as equal (predicted costs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
@lamc_command("diff")
def diff_command(a: Path, b: Path, rtol: float, as_json: bool) -> str:
    """Compare two plans (lamc plan --json) or two compiled pipelines; exit 1 if they differ."""
    kind_a, left = _load(a)
    kind_b, right = _load(b)
    if kind_a != kind_b:
        raise UsageError(f"{a} is a {kind_a} and {b} a {kind_b}: compare like with like")
    found = differences(left, right, rtol)
    if as_json:
        click.echo(json.dumps({"kind": kind_a, "equal": not found, "differences": found}, indent=2))
    else:
        for item in found:
            if item["change"] == "changed":
                click.echo(f"{item['path']}: {_short(item['a'])} -> {_short(item['b'])}")
            else:
                side = item["a"] if item["change"] == "only in A" else item["b"]
                click.echo(f"{item['path']}: {item['change']} ({_short(side)})")
    if found:
        raise CommandOutcome(1, f"{a} and {b} differ in {len(found)} place(s)")
    return f"{a} and {b} are the same {kind_a}"

"""`lamc inspect OUT`: a compiled manifest as a readable table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lamc.cli.tables import Table
from lamc.cli.ui import stdout_console
from lamc.quantity import format_bytes, format_ms
from lamc.verify import read_manifest


def show_manifest(out: Path, *, as_json: bool) -> str:
    manifest = read_manifest(out)
    if as_json:
        click.echo(manifest.to_json())
        return f"{out}: {len(manifest.stages)} stage(s)"
    console = stdout_console()
    console.print(
        f"model {manifest.model['name']} ({manifest.model['source']}), topology {manifest.topology['name']}"
    )
    console.print(
        "provenance: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.provenance.items()))
    )
    console.print(
        "dims: " + ", ".join(f"{k} {v.min}..{v.max}" for k, v in sorted(manifest.dims.items()))
    )
    table = Table(title="stages")
    for column in (
        "stage",
        "device",
        "backend / providers",
        "units",
        "files",
        "receives",
        "sends",
        "predicted",
    ):
        table.add_column(column)
    for s in manifest.stages:
        size = sum(f.size for f in s.files)
        units = (
            s.units[0] if len(s.units) == 1 else f"{s.units[0]} .. {s.units[-1]} ({len(s.units)})"
        )
        predicted = s.predicted
        table.add_row(
            str(s.index),
            f"{s.device} @ {s.host} ({s.kind})"
            + (
                "; replicated: " + ", ".join(f"{r.device} {r.share:.0%}" for r in s.replicas)
                if s.replicas
                else ""
            ),
            f"{s.backend} [{', '.join(s.providers)}] {s.precision}",
            units,
            f"{len(s.files)} file(s), {format_bytes(size)}",
            ", ".join(s.receives),
            ", ".join(s.sends) + (_to_text(manifest, s.index) if manifest.is_dag else ""),
            f"{format_ms(predicted.get('compute_ms', 0.0))}, {format_bytes(predicted.get('memory_bytes', 0.0))}",
        )
    console.print(table)
    tensors = Table(title="tensors at the stage boundaries")
    for column in ("tensor", "dtype", "shape"):
        tensors.add_column(column)
    boundary = sorted({n for s in manifest.stages for n in (*s.receives, *s.sends)})
    for name in boundary:
        spec = manifest.tensors[name]
        tensors.add_row(name, spec.dtype, "[" + ", ".join(str(d) for d in spec.shape) + "]")
    console.print(tensors)
    plan = manifest.plan
    console.print(
        f"plan: {plan['objective']}, bottleneck {format_ms(plan['bottleneck_ms'])}, latency {format_ms(plan['latency_ms'])}, limited by {plan.get('limited_by', '?')}"
    )
    if manifest.is_dag:
        console.print(f"branch-parallel: {plan.text}")
    if manifest.failover:
        from lamc.cli.plan_view import render_failover

        render_failover(manifest.failover, plan.text)
    return f"{out}: {manifest.model['name']} in {len(manifest.stages)} stage(s) on {manifest.topology['name']}"


def _to_text(manifest: Any, index: int) -> str:
    """Where a branch-parallel stage sends: a later stage, or the client."""
    to = manifest.successor(index)
    return " -> client" if to == len(manifest.stages) else f" -> stage {to}"

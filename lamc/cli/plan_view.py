"""How a plan is shown on a terminal: the stage table, the figures behind it, the
baselines, and (with --explain) every term of the cost model."""

from __future__ import annotations

import math
from typing import Any

from lamc.cli.tables import Table
from lamc.cli.ui import stdout_console
from lamc.quantity import format_bytes, format_flops, format_ms


def render_plan(best: Any, cost: Any, *, explain: bool) -> None:
    console = stdout_console()
    binding = ", ".join(f"{k}={v}" for k, v in best.binding.items())
    table = Table(title=f"{best.model} on {best.topology} ({best.objective}; {binding})")
    for column in (
        "stage",
        "device",
        "units",
        "params",
        "precision",
        "memory / capacity",
        "compute",
        "transfer to next",
    ):
        table.add_column(column, justify="left" if column in ("device", "units") else "right")
    for s in best.stages:
        units = (
            s.units[0] if len(s.units) == 1 else f"{s.units[0]} .. {s.units[-1]} ({len(s.units)})"
        )
        to_next = (
            f"{format_ms(s.transfer_ms)} ({format_bytes(s.transfer_bytes)})"
            if s.transfer_bytes
            else "-"
        )
        if best.is_dag:  # the stage it sends to is not always the next row
            target = "client" if s.to is None else f"stage {s.to}"
            to_next = f"to {target}: {to_next}"
        device = f"{s.device} ({s.kind}, {s.backend})"
        if s.replicas:  # each member with its share and its own time for the stage
            device = f"{len(s.replicas)} replicas ({s.kind}, {s.backend}): " + ", ".join(
                f"{r.device} {r.share:.0%} ({format_ms(r.compute_ms)})" for r in s.replicas
            )
        table.add_row(
            str(s.index),
            device,
            units,
            format_bytes(s.params_bytes),
            s.precision,
            f"{format_bytes(s.memory_bytes)} / {format_bytes(s.capacity_bytes)} ({s.memory_bytes / s.capacity_bytes:.0%})",
            format_ms(s.compute_ms),
            to_next,
        )
    console.print(table)
    if best.is_dag:
        console.print(f"branch-parallel: {best.text}")
    if best.replicated:
        console.print(
            f"replicated: {best.text} (a replicated stage's compute and transfer are per "
            "request, its devices together)"
        )
    for note in best.notes:
        console.print(f"note: {note}")
    console.print(
        f"predicted: {best.throughput_rps:.3g} req/s (bottleneck {format_ms(best.bottleneck_ms)}, limited by {best.bottleneck}); "
        f"latency {format_ms(best.latency_ms)}; fluid bound {format_ms(best.fluid_bound_ms)} "
        f"(plan at {best.fluid_ratio:.2f}x)"
    )
    counts = ", ".join(
        f"{k}: {format_ms(v) if math.isfinite(v) else 'none'}"
        for k, v in sorted(best.best_by_stages.items())
    )
    measure = {"throughput": "bottleneck", "latency": "latency"}.get(
        best.objective, f"prefill + {best.generation.get('new_tokens', 0)} decode steps"
    )
    if counts:
        console.print(f"best {measure} by number of stages: {counts}")
    if best.search != "exact":
        console.print(f"search: {best.search}; plan at {best.fluid_ratio:.2f}x the fluid bound")
    if best.generation:
        g = best.generation
        past = ", ".join(f"{k}={v}" for k, v in g["decode_binding"].items())
        console.print(
            f"generation: prefill {format_ms(g['prefill_ms'])}, decode {format_ms(g['decode_ms_per_token'])}/token "
            f"({past}), {g['new_tokens']} tokens in {format_ms(g['total_ms'])}"
        )
        for line in g["why"]:
            console.print(f"  why {len(best.stages)} stage(s): {line}")
    for s in best.stages:
        if s.precision_reason:
            console.print(f"stage {s.index} precision {s.precision}: {s.precision_reason}")
    if best.support and explain:
        for line in best.support:
            console.print(f"backend: {line}")
    elif best.support:
        console.print(
            f"backend: {len(best.support)} unit(s) kept off a device whose backend cannot run them (--explain lists them)"
        )
    for name, reason in sorted(best.unused.items()):
        console.print(f"unused: {name}: {reason}")
    for c in best.constraints:
        console.print(f"constraint: {c}")
    for b in best.budgets:
        console.print(
            f"budget {b.name}: {b.value:.4g} {b.unit} vs {b.limit:g} -> {'ok' if b.ok else 'BROKEN'}"
        )
    if best.alternatives:
        alt = Table(title="compared with")
        for column in ("method", "devices", "bottleneck", "latency", "vs lamc", "fits"):
            alt.add_column(column)
        alt.add_row(
            "lamc",
            ", ".join(s.device for s in best.stages),
            format_ms(best.bottleneck_ms),
            format_ms(best.latency_ms),
            "1.00x",
            "yes",
        )
        value = best.bottleneck_ms if best.objective == "throughput" else best.latency_ms
        for a in best.alternatives:
            theirs = a.bottleneck_ms if best.objective == "throughput" else a.latency_ms
            alt.add_row(
                f"{a.name}: {a.description}",
                ", ".join(a.devices),
                format_ms(a.bottleneck_ms),
                format_ms(a.latency_ms),
                f"{theirs / value:.2f}x" if math.isfinite(theirs) else "-",
                "yes" if a.feasible else f"no: {a.reason}",
            )
        alt.add_row(
            "fluid bound (no transfers, no memory limit)",
            "all",
            format_ms(best.fluid_bound_ms),
            "-",
            f"{best.fluid_bound_ms / best.bottleneck_ms:.2f}x",
            "-",
        )
        console.print(alt)
    if explain:
        for row in explain_rows(best, cost):
            console.print(row)


def explain_data(best: Any, cost: Any) -> list[dict[str, Any]]:
    """Every term behind each stage's numbers."""
    index = {d.name: i for i, d in enumerate(cost.devices)}
    out = []
    for s in best.stages:
        d = index[s.device]
        device = cost.devices[d]
        units = []
        cached = not s.unit_indices and cost.weights_cached(d, s.start_unit, s.end_unit)
        for u in s.unit_set:
            t = (cost.cached_times if cached else cost.unit_times)[d][u]
            units.append(
                {
                    "unit": t.unit,
                    "flops": t.flops,
                    "moved_bytes": t.moved_bytes,
                    "compute_bound_ms": t.compute_bound_ms,
                    "memory_bound_ms": t.memory_bound_ms,
                    "op_overhead_ms": t.overhead_ms,
                    "ops": t.ops,
                    "total_ms": t.total_ms,
                }
            )
        mem = cost.memory(d, s.start_unit, s.end_unit)
        if s.unit_indices:  # a branch-parallel stage: its own chain's figures
            mem = type(mem)(
                s.params_bytes, s.activation_bytes, s.runtime_bytes, s.kv_bytes, s.capacity_bytes
            )
        out.append(
            {
                "stage": s.index,
                "device": s.device,
                "peak_fp32_flops": device.peak("fp32"),
                "memory_bandwidth": device.memory_bandwidth,
                "call_overhead_ms": device.call_overhead_ms,
                "weights_in_cache": cached,
                "units": units,
                "memory": {
                    "params": mem.params,
                    "activations": mem.activations,
                    "runtime": mem.runtime,
                    "kv_cache": mem.kv_cache,
                    "capacity": mem.capacity,
                },
                "transfer": {
                    "bytes": s.transfer_bytes,
                    "route": list(s.route),
                    "ms": s.transfer_ms,
                },
            }
        )
    return out


def explain_rows(best: Any, cost: Any) -> list[str]:
    rows = [
        "",
        "how each number was computed (time = op overhead + max(FLOPs/peak, bytes/bandwidth)/efficiency, summed over ops):",
    ]
    for stage in explain_data(best, cost):
        rows.append(
            f"stage {stage['stage']} on {stage['device']}: peak {format_flops(stage['peak_fp32_flops'])}/s, "
            f"memory {format_bytes(stage['memory_bandwidth'])}/s, call overhead {format_ms(stage['call_overhead_ms'])}"
            + (", weights held in cache" if stage["weights_in_cache"] else "")
        )
        for u in stage["units"]:
            rows.append(
                f"  {u['unit']}: {format_flops(u['flops'])}, {format_bytes(u['moved_bytes'])} moved -> "
                f"compute-bound {format_ms(u['compute_bound_ms'])} + memory-bound {format_ms(u['memory_bound_ms'])} "
                f"+ overhead {format_ms(u['op_overhead_ms'])} ({u['ops']} ops) = {format_ms(u['total_ms'])}"
            )
        m = stage["memory"]
        rows.append(
            f"  memory: params {format_bytes(m['params'])} + activations {format_bytes(m['activations'])} + runtime {format_bytes(m['runtime'])}"
            + (f" + KV cache {format_bytes(m['kv_cache'])}" if m["kv_cache"] else "")
            + f" of {format_bytes(m['capacity'])}"
        )
        t = stage["transfer"]
        if t["bytes"]:
            rows.append(
                f"  transfer: {format_bytes(t['bytes'])} over {' / '.join(t['route']) or 'the host'} = {format_ms(t['ms'])}"
            )
    return rows


def render_failover(entries: Any, primary_text: str) -> None:
    """The failover plans as a table: device(s) lost -> the plan switched to."""
    if not entries:
        return
    console = stdout_console()
    table = Table(title="failover: the plan without each device")
    for column in ("lost", "stages", "bottleneck", "latency", "req/s", "headroom"):
        table.add_column(column)
    for entry in entries:
        lost = ", ".join(entry.lost)
        plan = entry.plan
        if plan is None:
            table.add_row(lost, f"none: {entry.reason}", "", "", "", "")
            continue
        same = " (unchanged)" if plan.text == primary_text else ""
        table.add_row(
            lost,
            plan.text + same,
            format_ms(plan.bottleneck_ms),
            format_ms(plan.latency_ms),
            f"{plan.throughput_rps:.3g}",
            f"{plan.headroom:.0%}" if plan.headroom is not None else "",
        )
    console.print(table)

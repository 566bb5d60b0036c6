"""`lamc plan --plot FILE`: what the plan predicts, drawn so that its bottleneck and every
device's memory headroom can be read off.

- **Timeline**: a few requests pipelined through every resource the plan uses (the
  client's link in, each stage's compute, each link, the link back to the client). Colour
  says what a bar is (compute or transfer); the label and the shade say which request.
  The bottleneck's row is marked, and the single-request latency is a dashed line.
- **Memory**: each device's share of its own capacity (so a Jetson and a server sit on one
  axis), split into parameters, activations, the runtime and the KV cache, with the GiB
  used, the capacity and the headroom written on every bar.
- **Baselines** (with `--compare`): the plan's throughput beside the equal split, the
  memory-proportional split and the best single device, under the same cost model.
- **Decode** (objective `generate`): one sequence's tokens, each a step through every
  stage and back, after the prefill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lamc.errors import missing_extra

COMPUTE, TRANSFER = "#4c78a8", "#f58518"
MEMORY_PARTS = (  # (label, colour, hatch): none of them a request's or a resource's colour
    ("params", "#54a24b", ""),
    ("activations", "#b279a2", "//"),
    ("runtime", "#bab0ac", ".."),
    ("KV cache", "#eeca3b", "xx"),
)
GIB = 2**30


def resources(
    plan: Any, decode: list[dict[str, float]] | None = None
) -> list[tuple[str, float, str]]:
    """(name, ms per request, kind) of every resource a request passes through, in order;
    with `decode` (the plan's `decode_stages`), those of one decode step."""
    inbound = float(plan.generation.get("decode_inbound_ms", 0.0)) if decode else plan.inbound_ms
    found: list[tuple[str, float, str]] = []
    if inbound > 0:
        found.append((f"client -> {plan.stages[0].device}", inbound, TRANSFER))
    for stage in plan.stages:
        share = decode[stage.index] if decode else None
        compute = share["compute_ms"] if share else stage.compute_ms
        transfer = share["transfer_ms"] if share else stage.transfer_ms
        found.append((f"stage {stage.index}: {stage.device}", compute, COMPUTE))
        if transfer > 0:
            nxt = (
                plan.stages[stage.index + 1].device
                if stage.index + 1 < len(plan.stages)
                else "client"
            )
            found.append((f"{stage.device} -> {nxt}", transfer, TRANSFER))
    return found


def timeline(plan: Any, requests: int = 4) -> list[tuple[str, int, float, float]]:
    """(resource, request, start ms, end ms) for `requests` pipelined requests.

    Each stage and each link is a resource that serves requests in order; a request
    enters a resource when it has left the previous one and the resource is free.
    """
    chain = resources(plan)
    free = [0.0] * len(chain)
    events = []
    for r in range(requests):
        t = 0.0
        for i, (name, duration, _) in enumerate(chain):
            start = max(t, free[i])
            end = start + duration
            free[i] = end
            t = end
            events.append((name, r, start, end))
    return events


def bottleneck_row(plan: Any) -> int:
    """The index (in `resources`) of the resource that limits throughput."""
    chain = resources(plan)
    return max(range(len(chain)), key=lambda i: chain[i][1])


def plot_plan(plan: Any, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "compile") from None
    chain = resources(plan)
    decode = (plan.generation or {}).get("decode_stages")
    baselines = [a for a in plan.alternatives]
    rows = 1 + int(bool(baselines) or bool(decode))
    fig = plt.figure(figsize=(14, 2.2 + 0.42 * max(len(chain), 4) * rows))
    grid = fig.add_gridspec(rows, 2, width_ratios=[3, 2], hspace=0.55, wspace=0.35)
    _timeline(fig.add_subplot(grid[0, 0]), plan, chain)
    _memory(fig.add_subplot(grid[0, 1]), plan)
    if decode:
        _decode(fig.add_subplot(grid[1, 0]), plan, decode)
    if baselines:
        _baselines(fig.add_subplot(grid[1, 1] if decode else grid[1, :]), plan, baselines)
    fig.suptitle(
        f"{plan.model} on {plan.topology} ({plan.objective}, {plan.binding}): "
        f"bottleneck {plan.bottleneck} {plan.bottleneck_ms:.3g} ms, "
        f"{plan.throughput_rps:.3g} req/s, latency {plan.latency_ms:.3g} ms, "
        f"headroom {plan.headroom:.0%}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _timeline(ax: Any, plan: Any, chain: list[tuple[str, float, str]]) -> None:
    requests = 4
    events = timeline(plan, requests)
    names = [name for name, _, _ in chain]
    kinds = {name: kind for name, _, kind in chain}
    span = max(e for *_, e in events) or 1.0
    for name, request, start, end in events:
        row = len(names) - 1 - names.index(name)
        shade = 1.0 - 0.18 * (request % 4)  # later requests paler: same colour, same kind
        ax.barh(
            row,
            end - start,
            left=start,
            color=kinds[name],
            alpha=shade,
            edgecolor="black",
            linewidth=0.4,
        )
        if end - start > 0.035 * span:  # a label only where it fits
            ax.text(
                start + (end - start) / 2, row, f"r{request}", ha="center", va="center", fontsize=7
            )
    worst = bottleneck_row(plan)
    labels = [
        f"{name}  [bottleneck {chain[i][1]:.3g} ms]" if i == worst else name
        for i, name in enumerate(names)
    ]
    ax.set_yticks(range(len(names)), list(reversed(labels)), fontsize=8)
    bottleneck_label = ax.get_yticklabels()[len(names) - 1 - worst]
    bottleneck_label.set_color("#d62728")
    bottleneck_label.set_fontweight("bold")
    row = len(names) - 1 - worst
    ax.axhspan(row - 0.45, row + 0.45, color="#d62728", alpha=0.08, zorder=0)
    ax.axvline(plan.latency_ms, color="black", linestyle="--", linewidth=0.8)
    ax.text(
        plan.latency_ms, -0.9, f" one request: {plan.latency_ms:.3g} ms", fontsize=7, va="center"
    )
    ax.set_ylim(-1.2, len(names) - 0.5)
    ax.set_xlabel("ms")
    what = "prompts (prefill)" if plan.generation else "requests"
    ax.set_title(
        f"{requests} {what} in flight: blue = compute, orange = transfer; r0 ... r{requests - 1} (paler = later)",
        fontsize=9,
    )


def _memory(ax: Any, plan: Any) -> None:
    stages = plan.stages
    labels = [f"{s.device} (stage {s.index})" for s in stages]
    positions = list(range(len(stages)))[::-1]
    left = [0.0] * len(stages)
    for label, colour, hatch in MEMORY_PARTS:
        key = {
            "params": "params_bytes",
            "activations": "activation_bytes",
            "runtime": "runtime_bytes",
            "KV cache": "kv_bytes",
        }[label]
        shares = [100.0 * getattr(s, key) / s.capacity_bytes for s in stages]
        if not any(shares):
            continue
        ax.barh(
            positions,
            shares,
            left=left,
            color=colour,
            hatch=hatch,
            edgecolor="black",
            linewidth=0.4,
            label=label,
        )
        left = [a + b for a, b in zip(left, shares)]
    for position, stage, used in zip(positions, stages, left):
        headroom = 100.0 - used
        ax.text(
            min(used, 100.0) + 1.5,
            position,
            f"{stage.memory_bytes / GIB:.2f} of {stage.capacity_bytes / GIB:.1f} GiB, "
            f"{headroom:.0f}% free",
            va="center",
            fontsize=7,
            color="#d62728" if headroom < 10 else "black",
        )
    ax.axvline(100.0, color="#d62728", linewidth=1.2)
    ax.set_xlim(0, 170)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xlabel("% of the device's memory (red line: capacity)")
    ax.set_title("memory per device", fontsize=9)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)


def _baselines(ax: Any, plan: Any, baselines: list[Any]) -> None:
    names = ["lamc (this plan)"]
    rates = [plan.throughput_rps]
    notes = [f"{plan.throughput_rps:.3g} req/s, latency {plan.latency_ms:.3g} ms"]
    for alt in baselines:
        names.append(alt.name)
        if alt.feasible and alt.bottleneck_ms > 0:
            rates.append(1000.0 / alt.bottleneck_ms)
            notes.append(
                f"{rates[-1]:.3g} req/s ({plan.throughput_rps / rates[-1]:.2f}x slower than lamc's), "
                f"latency {alt.latency_ms:.3g} ms"
            )
        else:
            rates.append(0.0)
            notes.append(f"does not fit: {alt.reason[:60]}")
    positions = list(range(len(names)))[::-1]
    colours = ["#4c78a8"] + ["#9ecae9"] * (len(names) - 1)
    ax.barh(positions, rates, color=colours, edgecolor="black", linewidth=0.4)
    top = max(rates) or 1.0
    for position, rate, note in zip(positions, rates, notes):
        ax.text(rate + top * 0.02, position, note, va="center", fontsize=7)
    ax.set_xlim(0, top * 2.2)
    ax.set_yticks(positions, names, fontsize=8)
    ax.set_xlabel("predicted throughput, req/s (same cost model)")
    ax.set_title("the plan beside the baselines", fontsize=9)


def _decode(ax: Any, plan: Any, decode: list[dict[str, float]]) -> None:
    """One sequence: the prefill, then a step per token through every stage and back."""
    generation = plan.generation
    steps = 3
    hops = resources(plan, decode)
    names = list(dict.fromkeys(name for name, _, _ in hops))
    prefill = float(generation["prefill_ms"])
    ax.barh(len(names), prefill, color="#bab0ac", edgecolor="black", linewidth=0.4)
    ax.text(
        prefill / 2, len(names), f"prefill {prefill:.3g} ms", ha="center", va="center", fontsize=7
    )
    step_ms = sum(d for _, d, _ in hops)
    span = prefill + steps * step_ms
    t = prefill
    for token in range(steps):
        for name, duration, kind in hops:
            row = len(names) - 1 - names.index(name)
            ax.barh(row, duration, left=t, color=kind, edgecolor="black", linewidth=0.4)
            if duration > 0.035 * span:
                ax.text(t + duration / 2, row, f"t{token}", ha="center", va="center", fontsize=6)
            t += duration
    ax.set_yticks(range(len(names) + 1), [*reversed(names), "prompt (all stages)"], fontsize=8)
    ax.set_xlabel("ms")
    ax.set_title(
        f"decode: {generation['decode_ms_per_token']:.3g} ms per token, one token at a time "
        f"through every stage; {generation['new_tokens']} tokens {generation['total_ms']:.4g} ms",
        fontsize=9,
    )

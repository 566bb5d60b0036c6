"""`lamc plan --plot FILE`: a pipeline timeline of a few requests and memory per device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lamc.errors import missing_extra


def timeline(plan: Any, requests: int = 4) -> list[tuple[str, int, float, float]]:
    """(resource, request, start ms, end ms) for `requests` pipelined requests.

    Each stage and each link is a resource that serves requests in order; a request
    enters a resource when it has left the previous one and the resource is free.
    """
    resources: list[tuple[str, float]] = []
    for stage in plan.stages:
        resources.append((f"{stage.index}: {stage.device}", stage.compute_ms))
        if stage.transfer_ms > 0:
            nxt = (
                plan.stages[stage.index + 1].device
                if stage.index + 1 < len(plan.stages)
                else "client"
            )
            resources.append((f"{stage.device} -> {nxt}", stage.transfer_ms))
    free = [0.0] * len(resources)
    events = []
    for r in range(requests):
        t = 0.0
        for i, (name, duration) in enumerate(resources):
            start = max(t, free[i])
            end = start + duration
            free[i] = end
            t = end
            events.append((name, r, start, end))
    return events


def plot_plan(plan: Any, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "compile") from None
    events = timeline(plan)
    names = list(dict.fromkeys(name for name, *_ in events))
    fig, (ax_time, ax_mem) = plt.subplots(
        1,
        2,
        figsize=(13, 1.2 + 0.5 * max(len(names), len(plan.stages))),
        gridspec_kw={"width_ratios": [3, 1]},
    )
    colors = plt.get_cmap("tab10")
    for name, request, start, end in events:
        row = len(names) - 1 - names.index(name)
        ax_time.barh(
            row,
            end - start,
            left=start,
            color=colors(request % 10),
            edgecolor="black",
            linewidth=0.4,
        )
        ax_time.text(
            start + (end - start) / 2, row, f"r{request}", ha="center", va="center", fontsize=7
        )
    ax_time.set_yticks(range(len(names)), list(reversed(names)))
    ax_time.set_xlabel("ms")
    ax_time.set_title(
        f"{plan.model} on {plan.topology}: {len(events) // max(len(names), 1)} requests, bottleneck {plan.bottleneck_ms:.3g} ms"
    )

    labels = [s.device for s in plan.stages]
    gib = 2**30
    parts = [
        ("params", [s.params_bytes / gib for s in plan.stages]),
        ("activations", [s.activation_bytes / gib for s in plan.stages]),
        ("runtime", [s.runtime_bytes / gib for s in plan.stages]),
        ("KV cache", [s.kv_bytes / gib for s in plan.stages]),
    ]
    bottom = [0.0] * len(labels)
    for label, values in parts:
        ax_mem.bar(labels, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_mem.scatter(
        labels,
        [s.capacity_bytes / gib for s in plan.stages],
        marker="_",
        s=600,
        color="red",
        label="capacity",
    )
    ax_mem.set_ylabel("GiB")
    ax_mem.set_title("memory per device")
    ax_mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

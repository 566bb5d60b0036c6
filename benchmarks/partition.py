"""The partitioner: planning time at scale, and lamc's plans beside the baselines.

    .venv/bin/python benchmarks/partition.py [--skip-models]

1. Time to plan 200 units over 8 heterogeneous devices (random costs, memories, links),
   both objectives; target (issue 3) under 2 s.
1b. Plan time and peak memory against device count (1-64), boards on a switched LAN: all
   identical (one device class: exact) and all different (2^D subsets: exact while the
   table fits its budget, then a beam search); the column `search` says which ran.
2. For gpt2-small, llama-1b and ResNet-50 on each example topology (throughput objective):
   lamc's predicted bottleneck and latency beside the equal split, the memory-proportional
   split, the best single device, and the fluid bound. Models are captured shapes-only.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from lamc.compiler import analyse
from lamc.frontend import CaptureOptions
from lamc.passes.partition.planner import PlanRequest, plan
from lamc.topology import load_topology, parse_topology
from lamc.workload import Cut, CutTensor, OpWork, Unit, Workload

ROOT = Path(__file__).parent.parent


def random_workload(n: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    units = []
    for i in range(n):
        flops = float(rng.uniform(0.2e9, 3e9))
        params = int(rng.uniform(5, 60) * 2**20)
        units.append(
            Unit(
                i,
                f"u{i}",
                "block",
                None,
                10,
                flops,
                flops,
                params,
                int(rng.uniform(1, 8) * 2**20),
                (OpWork("matmul", flops, float(params), "fp32", float(params)),),
                (f"w{i}",),
            )
        )
    cuts = tuple(
        Cut(k, (CutTensor(f"t{k}", "float", (1,), int(rng.uniform(0.1, 4) * 2**20)),))
        for k in range(n + 1)
    )
    return Workload("random-200", {}, tuple(units), cuts)


def random_topology(d: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = ["name: random-8", "devices:"]
    for i in range(d):
        lines.append(
            f"  - {{name: d{i}, kind: cpu, memory: {rng.uniform(1, 4):.2f}GiB, peak: {{fp32: {rng.uniform(0.1, 20):.2f}TFLOPS}}, memory_bandwidth: {rng.uniform(10, 500):.0f}GB/s}}"
        )
    lines.append("links:")
    for a in range(d):
        for b in range(a + 1, d):
            lines.append(
                f"  - {{a: d{a}, b: d{b}, bandwidth: {rng.uniform(0.1, 10):.2f}Gbit/s, latency: {rng.uniform(0.1, 5):.2f}ms}}"
            )
    return "\n".join(lines) + "\n"


def scale() -> None:
    workload = random_workload(200)
    topology = parse_topology(random_topology(8), "random-8.yaml")
    print("planning time, 200 units over 8 devices (target < 2 s):")
    for objective in ("throughput", "latency"):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            best, _ = plan(workload, topology, PlanRequest(objective=objective))
            times.append(time.perf_counter() - started)
        print(
            f"  {objective:10} {min(times):.2f} s (best of 3; {len(best.stages)} stages, bottleneck {best.bottleneck_ms:.1f} ms, latency {best.latency_ms:.1f} ms)"
        )


def switch_topology(count: int, distinct: bool) -> str:
    lines = ["lamc_topology: 1", f"name: lan-{count}", "devices:"]
    for i in range(count):
        tflops = 1.0 + (0.07 * i if distinct else 0.0)
        lines.append(
            f"  - {{name: b{i}, host: h{i}, kind: cpu, memory: 2GiB, peak: {{fp32: {tflops:.2f}TFLOPS}}, memory_bandwidth: 50GB/s}}"
        )
    # A switched LAN: every pair of boards one 1 Gbit/s hop apart.
    links = [
        f"  - {{a: h{i}, b: h{j}, bandwidth: 1Gbit/s, latency: 0.2ms}}"
        for i in range(count)
        for j in range(i + 1, count)
    ]
    lines += ["links:", *links] if links else ["links: []"]
    return "\n".join(lines) + "\n"


def plan_once(count: int, distinct: bool) -> dict[str, object]:
    """One planning run, in this process: seconds, stages, the search used, and the
    process's peak resident memory (it runs in a child of its own, so that is its own)."""
    import resource

    workload = random_workload(48, seed=1)
    topology = parse_topology(switch_topology(count, distinct))
    started = time.perf_counter()
    best, _ = plan(workload, topology, PlanRequest(objective="throughput"))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "stages": len(best.stages), "search": best.search, "peak": peak}


def device_count() -> None:
    import json
    import subprocess
    import sys

    from lamc.passes.partition import dp

    print(
        f"\nplan time and peak memory by device count (48 units, boards on a switched LAN; "
        f"exact table budget {dp.MEMORY_BUDGET_BYTES / 2**20:.0f} MiB; each run in a fresh process, "
        "peak = its whole resident memory, Python and numpy included):"
    )
    print("| devices | boards | plan s | peak RSS MiB | stages | search |")
    print("|---|---|---|---|---|---|")
    for count in (1, 2, 4, 8, 12, 13, 16, 20, 24, 32, 48, 64):
        for distinct in (False, True):
            run = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(count),
                    "--distinct" if distinct else "--same",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(
                f"| {count} | {'different' if distinct else 'identical'} | {r['seconds']:.2f} | "
                f"{r['peak'] / 2**20:.0f} | {r['stages']} | {r['search']} |"
            )


def fmt(ms: float) -> str:
    return f"{ms:.1f}" if math.isfinite(ms) else "-"


def models() -> None:
    topologies = sorted((ROOT / "examples" / "topologies").glob("*.yaml"))
    print(
        "\npredicted bottleneck / latency in ms (throughput objective; x = ratio to lamc's bottleneck; OOM = does not fit)"
    )
    print(
        "| model | topology | lamc | equal split | memory-proportional | best single device | fluid bound |"
    )
    print("|---|---|---|---|---|---|---|")
    for ref, label in (
        ("zoo:gpt2", "gpt2-small"),
        ("zoo:llama", "llama-1b"),
        ("zoo:resnet", "ResNet-50"),
    ):
        workload = analyse(ref, CaptureOptions(weights=False)).workload
        for path in topologies:
            topology = load_topology(path)
            try:
                best, _ = plan(workload, topology, PlanRequest(compare=True))
            except Exception as exc:  # a model that fits nowhere on this topology
                print(f"| {label} | {topology.name} | does not fit: {str(exc)[:60]} | | | | |")
                continue
            cells = [f"{fmt(best.bottleneck_ms)} / {fmt(best.latency_ms)} ({len(best.stages)} dev)"]
            for name in ("equal", "memory", "single"):
                alt = next(a for a in best.alternatives if a.name == name)
                ratio = alt.bottleneck_ms / best.bottleneck_ms
                cell = f"{fmt(alt.bottleneck_ms)} / {fmt(alt.latency_ms)} ({ratio:.2f}x)"
                cells.append(cell if alt.feasible else f"OOM ({cell})")
            cells.append(f"{fmt(best.fluid_bound_ms)} (lamc at {best.fluid_ratio:.2f}x)")
            print(f"| {label} | {topology.name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--distinct", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--same", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        import json

        print(json.dumps(plan_once(args.one, args.distinct)))
        return
    scale()
    device_count()
    if not args.skip_models:
        models()


if __name__ == "__main__":
    main()

"""Open-loop load test of load-adaptive variants (issue 13).

MiniLM (real weights) is compiled over three stage processes with `--variants
int8-dynamic,fp16`. The fp32 pipeline's capacity is measured closed-loop; then the same
schedule of arrivals (Poisson, stepping 0.5x -> 1x -> 2x -> 1x -> 0.5x of that capacity)
is offered twice, side by side: without adaptation, and with the client switching stages
up the variants ladder when the p95 latency is over the SLO (and back when it drops).
Goodput counts answers within the SLO per second of the schedule. Every answer is
checked against the fp32 in-process pipeline (normwise relative error, the manifest's
measure) and must lie within --max-error.

    .venv/bin/python benchmarks/variants.py [--phase-s 8] [--max-error 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPOLOGY = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"
PHASES = (0.5, 1.0, 2.0, 1.0, 0.5)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.abs(want).max())
    return float(np.abs(got.astype(np.float64) - want).max()) / scale if scale else 0.0


def offer(
    client: Any, pool: list[dict[str, np.ndarray]], arrivals: list[float], timeout_s: float
) -> list[tuple[int, float, Any]]:
    """Submit request i at arrivals[i] (seconds from now), without waiting for answers:
    (input index, latency in seconds or inf, answer or the exception)."""
    started = time.monotonic()
    futures = []
    done: dict[int, float] = {}
    for i, at in enumerate(arrivals):
        delay = started + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        future = client.submit(pool[i % len(pool)])
        # Called on the client's thread the moment the answer (or failure) is set.
        future.add_done_callback(lambda _, i=i: done.__setitem__(i, time.monotonic()))
        futures.append((i % len(pool), time.monotonic(), future))
    results = []
    for i, (index, sent, future) in enumerate(futures):
        try:
            answer = future.result(timeout=timeout_s + 5)
            results.append((index, done[i] - sent, answer))
        except Exception as exc:
            results.append((index, float("inf"), exc))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase-s", type=float, default=8.0)
    parser.add_argument("--max-error", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from lamc.compiler import CompileOptions, analyse, compile_model
    from lamc.frontend import random_inputs
    from lamc.passes.partition.planner import PlanRequest
    from lamc.runtime.executor import Pipeline
    from lamc.runtime.hosts import Endpoints
    from lamc.runtime.remote import RemotePipeline
    from lamc.topology import Constraints
    from lamc.verify import read_manifest
    from tests import minilm
    from tests.runtime.servers import StageServers

    ref = str(minilm.checkpoint())
    analysed = analyse(ref)
    rng = np.random.default_rng(args.seed)
    pool = [random_inputs(analysed.captured, analysed.workload.binding, rng) for _ in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "minilm"
        request = PlanRequest(constraints=Constraints(stages=3, exclude=("n100-d",)))
        options = CompileOptions(
            request=request,
            failover=0,
            variants=("int8-dynamic", "fp16"),
            max_error=args.max_error,
        )
        result = compile_model(ref, TOPOLOGY, out, options, analysed=analysed)
        for line in result.checks:
            if line.startswith("variants"):
                print(f"# {line}")
        manifest = read_manifest(out)
        if not manifest.variants:
            raise SystemExit("no variant was kept: nothing to switch to")
        reference = Pipeline.open(out)
        name = manifest.outputs[0]
        want = [reference.run(feeds)[name].astype(np.float64) for feeds in pool]
        with StageServers(out, len(manifest.stages)) as servers:
            endpoints = Endpoints(dict(enumerate(servers.addresses)))
            with RemotePipeline(out, endpoints, timeout_s=10) as client:
                client.run_many(pool, in_flight=8)  # warm
                alone = []
                for feeds in pool:
                    started = time.perf_counter()
                    client.run(feeds)
                    alone.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.run_many(pool * 6, in_flight=8)
                capacity = len(pool) * 6 / (time.perf_counter() - started)
            slo_ms = 4 * statistics.median(alone) * 1000
            print(
                f"# fp32 capacity {capacity:.1f} req/s (closed loop, 8 in flight); "
                f"one request alone {statistics.median(alone) * 1000:.1f} ms; SLO {slo_ms:.0f} ms"
            )
            arrivals_rng = np.random.default_rng(args.seed + 1)
            arrivals: list[float] = []
            t = 0.0
            for k, factor in enumerate(PHASES):
                end = (k + 1) * args.phase_s
                while True:
                    t += float(arrivals_rng.exponential(1.0 / (capacity * factor)))
                    if t >= end:
                        t = end
                        break
                    arrivals.append(t)
            duration = len(PHASES) * args.phase_s
            print()
            print(
                "| mode | offered | answered | within SLO | goodput req/s | p95 ms "
                "| max error vs fp32 | switches |"
            )
            print("|---|---|---|---|---|---|---|---|")
            goodputs = {}
            for mode in ("fp32 only", "with variants"):
                slo = slo_ms if mode == "with variants" else None
                with RemotePipeline(
                    out, endpoints, timeout_s=10, slo_ms=slo, max_error=args.max_error
                ) as client:
                    results = offer(client, pool, arrivals, timeout_s=10)
                    switches = list(client.variant_switches)
                    for variant in manifest.variants:  # back to the plan's own builds
                        client.use_variant(variant.stage, "")
                answered = [(i, lat, a) for i, lat, a in results if lat != float("inf")]
                within = [lat for _, lat, _ in answered if lat * 1000 <= slo_ms]
                errors = [relative_error(a[name], want[i]) for i, _, a in answered]
                latencies = sorted(lat for _, lat, _ in results)
                p95 = latencies[int(0.95 * (len(latencies) - 1))] * 1000
                goodputs[mode] = len(within) / duration
                print(
                    f"| {mode} | {len(results)} | {len(answered)} | {len(within)} "
                    f"| {goodputs[mode]:.1f} | {p95:.0f} | {max(errors, default=0):.3g} "
                    f"| {len(switches)} |",
                    flush=True,
                )
                for record in switches:
                    print(
                        f"#   {mode}: at {record['at'] - switches[0]['at']:.1f} s, level "
                        f"{record['level']}: stage {record['stage']} {record['method']} "
                        f"(p95 {record['p95_ms']} ms, {record['in_flight']} in flight)"
                    )
                worst = max(errors, default=0.0)
                if worst > args.max_error:
                    raise SystemExit(f"an answer is {worst:.3g} from fp32, over --max-error")
            print()
            print(
                f"goodput with variants / without: "
                f"{goodputs['with variants'] / goodputs['fp32 only']:.2f}x "
                f"(SLO {slo_ms:.0f} ms, phases {PHASES} x capacity, {args.phase_s:g} s each)"
            )


if __name__ == "__main__":
    main()

"""Pipelined serving: stage processes over gRPC, against what they should reach.

    .venv/bin/python benchmarks/serve.py [--requests 48] [--in-flight 8] [--rate-mbit 20]

1. **Local**: all-MiniLM-L6-v2 (real weights, seq 128) compiled into 3 stages, split so the
   middle stage is the slowest ([embeddings], [layers 0-4], [layer 5]: the two
   cores of a small machine then hold all three stages at the middle one's pace), served
   by 3 `lamc serve` processes on loopback with one intra-op thread each, driven with
   `--in-flight` requests outstanding. Measured requests/s vs the bound 1 / (slowest
   stage's time), each stage's time measured alone in this process (median, same
   inputs, one thread). Target >= 0.85.
2. **Emulated links**: the same stages compiled for a topology whose links are
   `--rate-mbit` Mbit/s with 1 ms latency, run with each stage in its own network
   namespace, the stage links shaped with `tc tbf` and the latency added by the sending
   stage. Measured requests/s vs the plan's predicted throughput. Target within 20%.
   Skipped, with the reason, where the machine does not allow namespaces.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "zoo:bert"
SPLIT = ("embeddings", "encoder.layer.4")

TOPOLOGY = """\
lamc_topology: 1
name: three-boxes-{rate}mbit
devices:
{devices}
links:
  - {{a: s0, b: s1, bandwidth: {rate}Mbit/s, latency: 1ms}}
  - {{a: s1, b: s2, bandwidth: {rate}Mbit/s, latency: 1ms}}
"""
DEVICE = (
    "  - {{name: {name}, host: {name}, kind: cpu, memory: 12GiB, "
    "peak: {{fp32: 217.6GFLOPS}}, memory_bandwidth: 38.4GB/s}}"
)


def compile_for(out: Path, rate_mbit: float, analysed: object) -> object:
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints

    devices = "\n".join(DEVICE.format(name=f"s{k}") for k in range(3))
    topology = out.parent / f"{out.name}.yaml"
    topology.write_text(TOPOLOGY.format(rate=rate_mbit, devices=devices))
    request = PlanRequest(constraints=Constraints(stages=3, split_after=SPLIT))
    return compile_model(MODEL, topology, out, CompileOptions(request=request), analysed=analysed)


def stage_times(out: Path, feeds: dict[str, np.ndarray], rounds: int = 15) -> list[float]:
    """Each stage alone, one intra-op thread, on the activations of one request."""
    from lamc.runtime.executor import load_stage
    from lamc.verify import verify

    manifest = verify(out)
    stages = [load_stage(out, spec, threads=1) for spec in manifest.stages]
    env = dict(feeds)
    times = []
    for stage in stages:
        arriving = {n: env[n] for n in stage.spec.receives}
        for _ in range(3):
            produced = stage.run(arriving)
        samples = []
        for _ in range(rounds):
            t = time.perf_counter()
            stage.run(arriving)
            samples.append((time.perf_counter() - t) * 1000)
        times.append(statistics.median(samples))
        env = {n: produced[n] if n in produced else arriving[n] for n in stage.spec.sends}
    return times


def measure(
    servers: object, out: Path, feeds: dict[str, np.ndarray], n: int, in_flight: int
) -> float:
    from lamc.runtime.hosts import Endpoints
    from lamc.runtime.remote import RemotePipeline

    endpoints = Endpoints(dict(enumerate(servers.addresses)))  # type: ignore[attr-defined]
    with RemotePipeline(out, endpoints, timeout_s=120) as client:
        client.run_many([feeds] * (2 * in_flight), in_flight=in_flight)  # warm every stage
        started = time.perf_counter()
        results = client.run_many([feeds] * n, in_flight=in_flight)
        elapsed = time.perf_counter() - started
        failures = [r for r in results if not isinstance(r, dict)]
        if failures:
            raise SystemExit(f"{len(failures)} request(s) failed: {failures[0]}")
        counts = client.counts
        assert counts["accepted"] == counts["succeeded"] + counts["failed"], dict(counts)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--rate-mbit", type=float, default=20.0)
    args = parser.parse_args()

    from lamc.compiler import analyse
    from lamc.frontend import random_inputs
    from tests.runtime.netns import EmulatedLinks, NetnsUnavailable, check_available
    from tests.runtime.servers import StageServers

    analysed = analyse(MODEL)
    feeds = random_inputs(analysed.captured, analysed.workload.binding, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "minilm"
        result = compile_for(out, args.rate_mbit, analysed)
        plan = result.plan  # type: ignore[attr-defined]
        times = stage_times(out, feeds)
        bound = 1000.0 / max(times)
        with StageServers(out, 3, common=["--threads", "1"]) as servers:
            local = measure(servers, out, feeds, args.requests, args.in_flight)
        rows = [
            (
                f"3 local stage processes, {args.in_flight} in flight",
                f"{local:.2f} req/s",
                f"{bound:.2f} req/s (slowest stage {max(times):.1f} ms; stages "
                + ", ".join(f"{t:.1f}" for t in times)
                + " ms)",
                local / bound,
                "≥ 0.85",
            )
        ]
        try:
            check_available()
            edge_ms = [s.transfer_ms for s in plan.stages[:-1]]
            delay = ["--delay-ms", "1"]
            with (
                EmulatedLinks(3, rate_mbit=args.rate_mbit) as net,
                StageServers(
                    out, 3, common=["--threads", "1"], extra={0: delay, 1: delay}, net=net
                ) as servers,
            ):
                emulated = measure(servers, out, feeds, args.requests // 2, args.in_flight)
            predicted = plan.throughput_rps
            rows.append(
                (
                    f"emulated {args.rate_mbit:g} Mbit/s, 1 ms links (netns + tbf)",
                    f"{emulated:.2f} req/s",
                    f"{predicted:.2f} req/s predicted (limited by {plan.bottleneck}; "
                    + ", ".join(f"link {t:.1f} ms" for t in edge_ms)
                    + ")",
                    emulated / predicted,
                    "0.8 - 1.2",
                )
            )
        except NetnsUnavailable as exc:
            rows.append(("emulated links", "skipped", str(exc), float("nan"), "0.8 - 1.2"))

    print(f"\n{MODEL} ({analysed.captured.name}), 3 stages split after {', '.join(SPLIT)}")
    print(f"{'case':<48} {'measured':>12}  {'ratio':>6}  target   reference")
    for case, measured, reference, ratio, target in rows:
        print(f"{case:<48} {measured:>12}  {ratio:6.3f}  {target:<8} {reference}")


if __name__ == "__main__":
    main()

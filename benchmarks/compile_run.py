"""Compile time, pipeline latency and executor cold start, each beside its plain baseline.

    .venv/bin/python benchmarks/compile_run.py [--model zoo:gpt2] [--stages 3] [--runs 30]

1. compile gpt2-small into 3 stages (`lamc compile`, everything from capture to the
   manifest) vs `torch.onnx.export(dynamo=True)` + save of the whole model; target <= 1.5;
2. latency of the 3-stage pipeline run by lamc.runtime in one process vs one ONNX Runtime
   session of the whole model (the baseline's file), same inputs, runs paired in ABBA
   order: the median of the paired ratios (and the ratio of medians); target <= 1.05;
3. cold start: lamc's executor (verify every hash, create every session) vs creating one
   ONNX Runtime session of the whole model; target <= 1.5.

Model construction is outside every timing; both sides use the same module.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lamc import models
from lamc.backends.onnxruntime.run import new_session, use_global_pool
from lamc.compiler import CompileOptions, analyse, compile_model
from lamc.frontend.torch import capture_spec
from lamc.passes.partition.planner import PlanRequest
from lamc.runtime.executor import Pipeline
from lamc.topology import Constraints

ROOT = Path(__file__).parent.parent


def plain_export_and_save(spec: models.ModelSpec, path: Path) -> float:
    dims = {d.name: torch.export.Dim(d.name, min=d.min, max=d.max) for d in spec.dims().values()}
    dynamic = {
        name: {axis: dims[d.name] for axis, d in axes.items()}
        for name, axes in spec.dynamic.items()
    }
    started = time.perf_counter()
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module,
            (),
            kwargs=dict(spec.example_inputs),
            dynamic_shapes=dynamic,
            dynamo=True,
            verbose=False,
        )
        program.save(str(path))
    return time.perf_counter() - started


def lamc_compile(spec: models.ModelSpec, ref: str, out: Path, stages: int) -> float:
    started = time.perf_counter()
    captured = capture_spec(spec, source=ref)
    analysed = analyse(ref, captured=captured)
    compile_model(
        ref,
        ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml",
        out,
        CompileOptions(request=PlanRequest(constraints=Constraints(stages=stages))),
        analysed=analysed,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:gpt2")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    _, name, *rest = args.model.split(":", 2)
    spec = models.build(name, rest[0] if rest else None)
    # lamc's executor runs the stages of one process on ONNX Runtime's global thread pool;
    # the single-session baseline gets the same pool, so only the split differs.
    use_global_pool()
    work = Path(tempfile.mkdtemp(prefix="lamc-bench-"))
    try:
        whole = work / "whole.onnx"
        out = work / "pipeline"
        # Warm-up of imports and first-call costs, paid by neither side.
        warm = models.build("gpt2", "test")
        plain_export_and_save(warm, work / "warm.onnx")
        lamc_compile(warm, "zoo:gpt2:test", work / "warm-out", 2)

        plain_s, lamc_s = [], []
        for i in range(2):
            if i % 2 == 0:
                plain_s.append(plain_export_and_save(spec, whole))
                lamc_s.append(lamc_compile(spec, args.model, out, args.stages))
            else:
                lamc_s.append(lamc_compile(spec, args.model, out, args.stages))
                plain_s.append(plain_export_and_save(spec, whole))

        # Cold start: create a session of the whole model vs verify + load the pipeline.
        cold_plain, cold_lamc = [], []
        for _ in range(3):
            started = time.perf_counter()
            session = new_session(str(whole))
            cold_plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            pipeline = Pipeline.open(out)
            cold_lamc.append(time.perf_counter() - started)

        # Latency: same inputs, runs interleaved.
        manifest = pipeline.manifest
        binding = manifest.plan["binding"]
        feeds = {
            "input_ids": np.random.default_rng(0)
            .integers(0, 50257, (binding.get("batch", 1), binding.get("seq", 128)))
            .astype(np.int64)
        }
        names = [o.name for o in session.get_outputs()]
        for _ in range(3):
            session.run(names, feeds)
            pipeline.run(feeds)
        # Pairs in ABBA order, so that drifts in the machine's load hit both sides alike.
        lat_plain, lat_lamc = [], []
        for i in range(args.runs):
            for side in ("plain", "lamc") if i % 2 == 0 else ("lamc", "plain"):
                started = time.perf_counter()
                if side == "plain":
                    reference = session.run(names, feeds)[0]
                    lat_plain.append(time.perf_counter() - started)
                else:
                    ours = pipeline.run(feeds)["logits"]
                    lat_lamc.append(time.perf_counter() - started)
        paired = statistics.median(o / p for o, p in zip(lat_lamc, lat_plain))
        error = float(np.abs(reference - ours).max())

        rows = [
            ("compile (capture .. manifest, 3 stages) vs export + save", plain_s, lamc_s, 1.5),
            ("latency, one request (batch 1, seq 128)", lat_plain, lat_lamc, 1.05),
            ("cold start: verify + create sessions", cold_plain, cold_lamc, 1.5),
        ]
        print(
            f"model {args.model}, {len(pipeline.stages)} stages; torch {torch.__version__}, onnxruntime {ort.__version__}"
        )
        print(
            f"{'measure':58} {'plain (median)':>15} {'lamc (median)':>15} {'ratio':>7} {'target':>7}"
        )
        for label, plain, ours_list, target in rows:
            p, o = statistics.median(plain), statistics.median(ours_list)
            print(
                f"{label:58} {p * 1000:13.1f}ms {o * 1000:13.1f}ms {o / p:7.3f} {'<= ' + str(target):>7}"
            )
        print(f"latency, median of the {args.runs} paired ratios (the robust figure): {paired:.3f}")
        print(f"pipeline vs whole-model session, max abs difference of the logits: {error:.3g}")
        print(f"(runs: compile {len(lamc_s)}, latency {args.runs} interleaved, cold start 3)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

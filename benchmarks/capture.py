"""Capture + analysis time of lamc vs a plain dynamo ONNX export, side by side.

    .venv/bin/python benchmarks/capture.py [--model zoo:gpt2] [--repeats 3]

Both sides export the same module with the same dynamic dims in one process; the runs
alternate so that machine noise hits both. Model construction is outside both timings.
Target (issue 2): lamc / plain <= 1.15.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings

import torch

from lamc import models
from lamc.compiler import analyse
from lamc.frontend.torch import capture_spec


def plain_export(spec: models.ModelSpec) -> float:
    """What a user would otherwise run: torch.onnx.export(dynamo=True) with the same dims."""
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
        torch.onnx.export(
            spec.module,
            (),
            kwargs=dict(spec.example_inputs),
            dynamic_shapes=dynamic,
            dynamo=True,
            verbose=False,
        )
    return time.perf_counter() - started


def lamc_capture(spec: models.ModelSpec, ref: str) -> tuple[float, float]:
    started = time.perf_counter()
    captured = capture_spec(spec, source=ref)
    capture_s = time.perf_counter() - started
    analyse(ref, captured=captured)
    return time.perf_counter() - started, capture_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, name, *rest = args.model.split(":", 2)
    spec = models.build(name, rest[0] if rest else None)

    warm = models.build("gpt2", "test")  # imports and first-call costs, paid by neither side
    plain_export(warm)
    lamc_capture(warm, "zoo:gpt2:test")

    plain: list[float] = []
    ours: list[float] = []
    for i in range(args.repeats):
        if i % 2 == 0:
            plain.append(plain_export(spec))
            ours.append(lamc_capture(spec, args.model)[0])
        else:
            ours.append(lamc_capture(spec, args.model)[0])
            plain.append(plain_export(spec))
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"model: {args.model}  repeats: {args.repeats}  torch {torch.__version__}")
    print(f"{'':34} {'median s':>9} {'runs':>30}")
    print(
        f"{'torch.onnx.export(dynamo=True)':34} {p:9.2f}   {', '.join(f'{x:.2f}' for x in plain):>28}"
    )
    print(f"{'lamc capture + analysis':34} {o:9.2f}   {', '.join(f'{x:.2f}' for x in ours):>28}")
    print(f"ratio lamc / plain: {o / p:.3f}  (target <= 1.15)")
    sys.exit(0)


if __name__ == "__main__":
    main()

"""Link codecs at compile time: give each edge between stages its codec, measured against
the source model on calibration inputs, within the accuracy budget."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lamc.codecs import LOSSY_CODECS, encoded_bytes
from lamc.compiler.validate import inputs_for
from lamc.errors import AccuracyError
from lamc.frontend import Captured
from lamc.manifest import EdgeTensor, Manifest
from lamc.runtime.executor import Pipeline
from lamc.workload import Workload


def output_error(
    pipeline: Any,
    reference: Any,
    cases: list[tuple[str, dict[str, Any]]],
) -> float:
    """Max over cases and outputs of max |out - ref| / max |ref| (normwise relative error)."""
    worst = 0.0
    for _, feeds in cases:
        got = pipeline.run(feeds)
        for name, want in reference(feeds).items():
            want64 = np.asarray(want, dtype=np.float64)
            diff = np.abs(got[name].astype(np.float64) - want64)
            scale = float(np.abs(want64).max()) if want64.size else 0.0
            error = float(diff.max()) if diff.size else 0.0
            worst = max(worst, error / scale if scale > 0 else error)
    return worst


def choose_codecs(
    captured: Captured,
    workload: Workload,
    manifest: Manifest,
    out: Path,
    codec: str,
    max_error: float,
) -> Manifest:
    """Give each edge between stages its codec and measure the model's output error with
    them on calibration inputs (the example inputs and random ones in the dynamic ranges).

    `auto` tries, edge by edge, int8 then fp16 and keeps the first that leaves the whole
    model within `max_error`; a fixed lossy codec that breaks the budget is an accuracy
    error (exit 7)."""
    if captured.reference is None:
        raise AccuracyError("lossy link codecs need the model's weights to measure their error")
    pipeline = Pipeline.load(out, manifest)
    cases = inputs_for(captured, manifest, samples=2, seed=1)
    inner = range(1, len(manifest.stages))
    chosen = {k: "raw" for k in inner}

    def measure(trial: dict[int, str]) -> float:
        pipeline.codecs = {
            k: {t.name: c for t in manifest.edges[k].tensors} for k, c in trial.items()
        }
        return output_error(pipeline, captured.reference, cases)

    if codec == "auto":
        error = measure(chosen)
        for k in inner:
            for candidate in LOSSY_CODECS:
                trial_error = measure({**chosen, k: candidate})
                if trial_error <= max_error:
                    chosen[k], error = candidate, trial_error
                    break
    else:
        chosen = {k: codec for k in inner}
        error = measure(chosen)
        if error > max_error:
            raise AccuracyError(
                f"--codec {codec} puts the model outputs {error:.3g} (relative) from the source model, over the budget --max-error {max_error:g}",
                hint="use --codec auto (it keeps the error within the budget), fp16 or raw, or raise --max-error",
            )
    sizes = {t.name: (t.bytes, t.dtype) for cut in workload.cuts for t in cut.tensors}
    edges = []
    for edge in manifest.edges:
        codec_k = chosen.get(edge.target, "raw") if edge.source >= 0 else "raw"
        nbytes = edge.bytes
        if codec_k != "raw":
            nbytes = int(
                sum(encoded_bytes(*sizes.get(t.name, (0, "")), codec_k) for t in edge.tensors)
            )
        tensors = tuple(EdgeTensor(t.name, codec_k) for t in edge.tensors)
        edges.append(replace(edge, tensors=tensors, bytes=nbytes))
    plan = replace(manifest.plan, codec=codec, max_error=max_error, measured_error=error)
    return replace(manifest, edges=tuple(edges), plan=plan)

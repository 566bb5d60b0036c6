"""Compression at compile time: calibration samples, the stage passes, the accuracy check
against the source model, and `--compress auto` stepping back when the budget breaks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lamc.backends.onnxruntime.run import new_session
from lamc.backends.slice import StageGraph
from lamc.compiler.codecs import output_error
from lamc.compiler.validate import inputs_for
from lamc.errors import AccuracyError, EngineBuildError, UsageError
from lamc.frontend import Captured, random_inputs
from lamc.manifest import Manifest
from lamc.passes.base import PassManager
from lamc.passes.compress import PRECISION_ORDER, CompressStage
from lamc.passes.partition.planner import PlanRequest
from lamc.plan import Plan
from lamc.runtime.executor import Pipeline


def compress_stages(
    graphs: list[StageGraph],
    methods: dict[int, str],
    calibration: list[list[dict[str, Any]]] | None,
    dump_ir: Path | None = None,
) -> list[StageGraph]:
    """Each stage's model through its compression pass (fp32 stages as they are)."""
    out = []
    for graph in graphs:
        method = methods[graph.index]
        if method == "fp32":
            out.append(graph)
            continue
        samples = calibration[graph.index] if calibration is not None else None
        manager = PassManager(
            [CompressStage(method, samples)],
            dump_ir=dump_ir / f"stage-{graph.index}" if dump_ir is not None else None,
        )
        try:
            model = manager.run(graph.to_model()).model
        except EngineBuildError as exc:
            exc.message = f"stage {graph.index}: {exc.message}"
            raise
        out.append(StageGraph.from_model(graph.index, model, method))
    return out


def step_back(
    spec: str | None, request: PlanRequest, best: Plan, exc: AccuracyError, notes: list[str]
) -> PlanRequest:
    """`--compress auto` broke the accuracy budget: take the least precise method of the
    plan away from its device and plan again (never past fp32, so this ends)."""
    if spec != "auto" or request.methods is None:
        raise exc
    worst = max(best.stages, key=lambda s: PRECISION_ORDER.index(s.precision))
    if worst.precision == "fp32":
        raise exc
    allowed = dict(request.methods)
    allowed[worst.device] = tuple(m for m in allowed[worst.device] if m != worst.precision)
    notes.append(
        f"--compress auto: {worst.precision} on {worst.device} broke the accuracy budget "
        f"({exc.message}); planned again without it"
    )
    return replace(request, methods=allowed)


def check_compression(
    captured: Captured, manifest: Manifest, out: Path, max_error: float
) -> Manifest:
    """Measure the compressed pipeline's output error against the source model on
    calibration inputs; over `max_error` is an accuracy error (exit 7)."""
    if captured.reference is None:
        raise AccuracyError("compression needs the model's weights to measure its error")
    cases = inputs_for(captured, manifest, samples=2, seed=1)
    error = output_error(Pipeline.load(out, manifest), captured.reference, cases)
    if error > max_error:
        stages = ", ".join(f"stage {s.index} {s.precision}" for s in manifest.stages)
        raise AccuracyError(
            f"compression ({stages}) puts the model outputs {error:.3g} (relative) from the source model, over the budget --max-error {max_error:g}",
            hint="compress less (fp16, or fp32 on some devices: --compress gpu=fp16,cpu=fp32) or raise --max-error",
        )
    plan = replace(manifest.plan, max_error=max_error, compression_error=error)
    return replace(manifest, plan=plan)


def calibration_inputs(
    captured: Captured, path: Path | None, count: int = 16
) -> list[dict[str, Any]]:
    """Input samples for static quantisation: from an .npz (`NAME` for one sample, or
    `K/NAME` for sample K), else generated in the dynamic ranges at the operating point."""
    if path is None:
        rng = np.random.default_rng(7)
        samples = [dict(captured.example_inputs)]
        for _ in range(count - 1):
            samples.append(random_inputs(captured, captured.operating_point, rng))
        return samples
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--calibration {path}: not a readable .npz ({exc})") from None
    grouped: dict[str, dict[str, Any]] = {}
    for key in data.files:
        index, _, name = key.rpartition("/")
        grouped.setdefault(index or "0", {})[name] = data[key]
    samples = []
    for index, sample in sorted(grouped.items(), key=lambda kv: (len(kv[0]), kv[0])):
        missing = sorted(set(captured.input_names) - set(sample))
        if missing:
            raise UsageError(
                f"--calibration {path}: sample {index} lacks {', '.join(missing)} (keys are NAME or K/NAME)"
            )
        samples.append({n: sample[n] for n in captured.input_names})
    return samples


def stage_samples(graphs: list[Any], samples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """What arrives at each stage when the fp32 stages run on `samples`."""
    sessions = [new_session(g.proto().SerializeToString(), optimization="basic") for g in graphs]
    per_stage: list[list[dict[str, Any]]] = [[] for _ in graphs]
    for sample in samples:
        env = dict(sample)
        for k, (graph, session) in enumerate(zip(graphs, sessions)):
            arriving = {n: env[n] for n in graph.inputs}
            per_stage[k].append(arriving)
            names = [o.name for o in session.get_outputs()]
            env.update(zip(names, session.run(names, arriving)))
    return per_stage

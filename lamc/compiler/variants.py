"""`lamc compile --variants int8-dynamic,fp16`: faster builds of the primary plan's stages,
for the controller to switch to under load.

For each fp32 stage and each method asked for, the stage is compressed and built (its
weights join the shared weight files), its speedup on its device predicted by the cost
model (as `--compress auto` chooses methods), its speedup on the compile host measured,
and the pipeline's output error with it switched on measured against the source model.
Each stage keeps the method predicted fastest on its device among those faster than its
fp32 build and within `--max-error` on their own. The kept variants form a ladder, the stage predicted slowest
(the bottleneck) first; each step's error is measured with every earlier step on too, and
the ladder ends before the first step that would break the budget.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lamc.backends.protocol import Backend
from lamc.backends.slice import StageGraph
from lamc.backends.weights import SharedWeights
from lamc.compiler.codecs import output_error
from lamc.compiler.compression import calibration_inputs, compress_stages, stage_samples
from lamc.compiler.validate import inputs_for
from lamc.cost import CostModel
from lamc.errors import EngineBuildError, UsageError
from lamc.frontend import Captured
from lamc.manifest import Manifest, StageSpec, StageVariant
from lamc.passes.compress import CALIBRATED, METHODS
from lamc.plan import Plan
from lamc.runtime.executor import Pipeline, load_stage
from lamc.topology import Topology
from lamc.workload import Workload

# A variant must be predicted this much faster than its fp32 build on its device.
MIN_SPEEDUP = 1.05


def parse_variants(text: str | None) -> tuple[str, ...]:
    """`--variants int8-dynamic,fp16`: compression methods (fp32 is the plan's own)."""
    if not text:
        return ()
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    for method in methods:
        if method == "fp32" or method not in METHODS:
            known = ", ".join(m for m in METHODS if m != "fp32")
            raise UsageError(f"--variants: unknown method {method!r}", hint=f"methods: {known}")
    return methods


@dataclass
class _Candidate:
    stage: int
    method: str
    spec: StageSpec
    speedup: float  # predicted on its device
    measured: float  # on the compile host
    error: float  # with this stage alone switched on
    folder: str


def build_variants(
    captured: Captured,
    workload: Workload,
    plan: Plan,
    topology: Topology,
    manifest: Manifest,
    graphs: list[StageGraph],
    backends: dict[int, Backend],
    tmp: Path,
    shared: SharedWeights,
    methods: tuple[str, ...],
    max_error: float,
    check: bool = True,
    calibration: Path | None = None,
) -> tuple[Manifest, list[str]]:
    """The manifest with its `variants` ladder, and a line per decision for the report."""
    if captured.reference is None:
        raise UsageError("--variants needs the model's weights to measure the variants' error")
    notes: list[str] = []
    # What arrives at each fp32 stage: 16 samples to calibrate the int8 methods, when one
    # is asked for; the first 4 (the same inputs either way) to time the builds on.
    calibrated = any(m in CALIBRATED for m in methods)
    calibration_samples = stage_samples(
        graphs, calibration_inputs(captured, calibration, count=16 if calibrated else 4)
    )
    arriving = [samples[:4] for samples in calibration_samples]
    cases = inputs_for(captured, manifest, samples=2, seed=1)
    chosen: list[_Candidate] = []
    costs = CostModel(workload, topology)
    names = [d.name for d in topology.devices]

    def predicted_speedup(index: int, method: str) -> float:
        stage = plan.stages[index]
        at = (names.index(stage.device), stage.start_unit, stage.end_unit)
        faster = costs.with_method(METHODS[method].cost).compute_ms(*at)
        return costs.compute_ms(*at) / faster if faster > 0 else 1.0

    for graph, spec in zip(graphs, manifest.stages):
        if spec.precision != "fp32":
            notes.append(f"variants: stage {spec.index} is built {spec.precision}; none made")
            continue
        base_ms = _time_ms(load_stage(tmp, spec), arriving[spec.index])
        best: _Candidate | None = None
        for method in methods:
            refused = backends[spec.index].accepts(method)
            if refused is not None:
                notes.append(f"variants: stage {spec.index} {method}: {refused.message}")
                continue
            folder = f"variants/{method}/stage-{spec.index}"
            try:
                variant = _build_one(
                    graph,
                    spec,
                    method,
                    folder,
                    calibration_samples if calibrated else None,
                    backends[spec.index],
                    topology,
                    tmp,
                    shared,
                    check,
                )
            except EngineBuildError as exc:
                notes.append(f"variants: stage {spec.index} {method}: {exc.message}")
                shutil.rmtree(tmp / folder, ignore_errors=True)
                continue
            speedup = predicted_speedup(spec.index, method)
            measured = base_ms / _time_ms(load_stage(tmp, variant), arriving[spec.index])
            error = _error(captured, manifest, {spec.index: variant}, tmp, cases)
            notes.append(
                f"variants: stage {spec.index} {method}: predicted {speedup:.2f}x its fp32 "
                f"build on {spec.device}, {measured:.2f}x here; output error {error:.3g} "
                "with it alone"
            )
            keep = speedup >= MIN_SPEEDUP and error <= max_error
            if keep and (best is None or speedup > best.speedup):
                if best is not None:
                    shutil.rmtree(tmp / best.folder, ignore_errors=True)
                best = _Candidate(spec.index, method, variant, speedup, measured, error, folder)
            else:
                shutil.rmtree(tmp / folder, ignore_errors=True)
        if best is not None:
            chosen.append(best)
    # The ladder: the stage the plan predicts slowest first.
    chosen.sort(key=lambda c: -manifest.stages[c.stage].predicted.get("compute_ms", 0.0))
    ladder: list[StageVariant] = []
    switched: dict[int, StageSpec] = {}
    for candidate in chosen:
        switched[candidate.stage] = candidate.spec
        error = _error(captured, manifest, switched, tmp, cases)
        if error > max_error:
            notes.append(
                f"variants: the ladder stops before stage {candidate.stage} {candidate.method} "
                f"(output error {error:.3g} with it, over --max-error {max_error:g})"
            )
            for rest in chosen[len(ladder) :]:
                shutil.rmtree(tmp / rest.folder, ignore_errors=True)
            break
        ladder.append(
            StageVariant(
                candidate.stage,
                candidate.method,
                len(ladder) + 1,
                error,
                round(candidate.speedup, 3),
                candidate.spec,
                round(candidate.measured, 3),
            )
        )
    if ladder:
        notes.append(
            "variants: ladder "
            + " -> ".join(f"stage {v.stage} {v.method} ({v.error:.3g})" for v in ladder)
        )
    return replace(manifest, variants=tuple(ladder)), notes


def _build_one(
    graph: StageGraph,
    spec: StageSpec,
    method: str,
    folder: str,
    calibration: list[list[dict[str, Any]]] | None,
    backend: Backend,
    topology: Topology,
    tmp: Path,
    shared: SharedWeights,
    check: bool,
) -> StageSpec:
    """Stage `spec` compressed with `method`, built under `folder` (weights shared)."""
    (compressed,) = compress_stages([graph], {spec.index: method}, calibration)
    artifact = backend.build(
        compressed, topology.device(spec.device), tmp, check=check, folder=folder, shared=shared
    )
    weight_files = shared.files()
    files = tuple(artifact.files) + tuple(
        weight_files[path] for path in sorted({ref.file for ref in artifact.weights})
    )
    if tuple(compressed.inputs) != spec.inputs or tuple(compressed.outputs) != spec.outputs:
        raise EngineBuildError(f"its graph's inputs or outputs differ from stage {spec.index}'s")
    return replace(
        spec,
        backend=artifact.backend,
        providers=tuple(artifact.providers),
        session=dict(artifact.session),
        precision=method,
        model=artifact.model,
        files=files,
        weights=artifact.weights,
    )


def _time_ms(runner: Any, samples: list[dict[str, Any]], repeats: int = 3) -> float:
    """Median milliseconds of one run of `runner` over `samples` (after one warm-up)."""
    runner.run(samples[0])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for sample in samples:
            runner.run(sample)
        times.append((time.perf_counter() - started) * 1000 / len(samples))
    return statistics.median(times)


def _error(
    captured: Captured,
    manifest: Manifest,
    switched: dict[int, StageSpec],
    tmp: Path,
    cases: list[tuple[str, dict[str, Any]]],
) -> float:
    stages = tuple(switched.get(s.index, s) for s in manifest.stages)
    pipeline = Pipeline.load(tmp, replace(manifest, stages=stages))
    return output_error(pipeline, captured.reference, cases)

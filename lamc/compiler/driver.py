"""The compile driver, top to bottom: capture -> passes -> plan -> tag -> slice -> compress
-> build -> manifest -> accuracy checks, written atomically.

Each step is one call you can see here; the algorithms live in the modules it calls. The
CLI and the Python API both go through it.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from lamc.atomic import atomic_directory, check_writable
from lamc.backends import registry
from lamc.backends.protocol import Artifact, Backend
from lamc.backends.slice import StageGraph, slice_stages
from lamc.backends.weights import SharedWeights
from lamc.compiler.analysis import ANALYSIS_PASSES, Analysed, analyse
from lamc.compiler.codecs import choose_codecs
from lamc.compiler.compression import (
    calibration_inputs,
    check_compression,
    compress_stages,
    stage_samples,
    step_back,
)
from lamc.compiler.failover import Planned, default_depth, plan_failovers
from lamc.compiler.manifest_build import build_manifest, model_sha256
from lamc.compiler.planning import plan_model, with_compression
from lamc.compiler.variants import build_variants
from lamc.errors import AccuracyError, DoesNotFitError, UsageError
from lamc.frontend import CaptureOptions
from lamc.manifest import Edge, FailoverPlan, Manifest, StageSpec
from lamc.passes.base import PassManager
from lamc.passes.compress import CALIBRATED
from lamc.passes.partition.planner import PlanRequest
from lamc.passes.partition.tag import TagStages
from lamc.plan import Plan
from lamc.topology import Topology, load_topology


@dataclass
class CompileOptions:
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    request: PlanRequest | None = None
    backend: str = "auto"  # onnxruntime | tensorrt | auto
    check: bool = True  # run the ONNX checker and load every stage in ONNX Runtime
    dump_ir: Path | None = None
    granularity: str = "block"
    max_error: float = 0.01  # accuracy budget for lossy choices (link codecs, compression)
    compress: str | None = None  # --compress SPEC: a method, or DEVICE_OR_KIND=METHOD,...
    calibration: Path | None = None  # .npz of input samples (int8; default: generated)
    # Plan for this many lost devices at once (0: none; None: 1 with 3+ devices, else 0).
    failover: int | None = None
    # Faster builds of the primary stages to switch to under load (compression methods).
    variants: tuple[str, ...] = ()


@dataclass
class CompileResult:
    out: Path
    manifest: Manifest
    plan: Plan
    seconds: dict[str, float]
    checks: list[str]


def compile_model(
    ref: str,
    topology_path: Path,
    out: Path,
    options: CompileOptions | None = None,
    *,
    analysed: Analysed | None = None,
    steps: object | None = None,
) -> CompileResult:
    """capture -> passes -> plan -> build, written atomically.

    With `--compress auto`, a plan whose compression breaks the accuracy budget is planned
    again with its least precise method taken from that device, until it holds."""
    options = options or CompileOptions()
    timer = _Timer(steps)
    check_writable(out)
    topology = load_topology(topology_path)
    with timer.step("capture and analyse"):
        if analysed is None:
            analysed = analyse(
                ref, options.capture, dump_ir=options.dump_ir, granularity=options.granularity
            )
    if not analysed.captured.has_weights:
        raise UsageError(
            "a shapes-only capture (--no-weights) cannot be compiled: the stages need the weights"
        )
    captured = analysed.captured
    if captured.source_sha256 is None:
        # The model's identity, taken before a plan's stage tags are set on its nodes:
        # the same model has the same sha256 in the manifest, however it was split.
        captured.source_sha256 = model_sha256(captured.model)
    request = with_compression(options.request or PlanRequest(), options.compress, topology)
    notes: list[str] = []
    while True:
        with timer.step("partition"):
            best, _ = plan_model(analysed, topology, request, backend=options.backend)

        def failover(primary: Plan = best, planned: PlanRequest = request) -> list[Planned]:
            depth = default_depth(topology) if options.failover is None else options.failover
            return plan_failovers(
                analysed,
                topology,
                primary,
                planned,
                depth,
                compress=options.compress,
                backend=options.backend,
            )

        try:
            manifest, checks = _build_pipeline(
                analysed, topology, best, out, options, timer, failover
            )
        except AccuracyError as exc:
            request = step_back(options.compress, request, best, exc, notes)
            continue
        return CompileResult(out, manifest, best, timer.seconds, notes + checks)


def _build_pipeline(
    analysed: Analysed,
    topology: Topology,
    best: Plan,
    out: Path,
    options: CompileOptions,
    timer: _Timer,
    failover: Callable[[], list[Planned]] = list,
) -> tuple[Manifest, list[str]]:
    """tag -> slice -> compress -> build -> manifest -> accuracy checks, then the failover
    pipelines beside it (their weights shared), written atomically."""
    captured, workload = analysed.captured, analysed.workload
    if not best.budgets_ok:
        broken = "; ".join(
            f"{b.name} {b.value:.4g} vs limit {b.limit:g}" for b in best.budgets if not b.ok
        )
        raise DoesNotFitError(f"the plan breaks a budget: {broken}")
    methods = {s.index: s.precision for s in best.stages}
    checks: list[str] = []
    # Failover plans and variants are chains of one device a stage: not built for plans
    # whose stages run side by side or on several devices.
    shapes = (
        (
            best.is_dag,
            f"branch-parallel plans (this plan runs branches side by side: {best.text})",
            "pass --branches off to plan a chain",
            "branch-parallel: stages on the branches run side by side; no failover plans",
        ),
        (
            best.replicated,
            f"plans with replicated stages (this plan: {best.text}; Ray Serve, which serves "
            "it, replaces a lost replica itself)",
            "pass --replicate off to plan one device a stage",
            "replicated stages: each engine built once for all its devices; serve with "
            "`lamc serve OUT --ray ADDRESS`; no failover plans",
        ),
    )
    for present, what, hint, check in shapes:
        if not present:
            continue
        refused = [
            flag
            for flag, asked in (
                ("failover plans (--failover)", bool(options.failover)),
                ("variants (--variants)", bool(options.variants)),
            )
            if asked
        ]
        if refused:
            raise UsageError(f"{' and '.join(refused)} are not built for {what}", hint=hint)
        checks.append(check)
    with atomic_directory(out) as tmp, contextlib.closing(SharedWeights(tmp)) as shared:
        graphs, artifacts = _make_stages(analysed, topology, best, tmp, options, timer, shared)
        if options.check:
            checks += [
                f"stage {k}: passes onnx.checker (full) and loads in ONNX Runtime"
                for k in range(len(graphs))
            ]
        with timer.step("manifest"):
            manifest = build_manifest(
                captured,
                workload,
                topology,
                best,
                graphs,
                artifacts,
                tmp,
                request_context(options),
                shared.files(),
            )
        if any(m != "fp32" for m in methods.values()):
            with timer.step("accuracy"):
                manifest = check_compression(captured, manifest, tmp, options.max_error)
                checks.append(
                    f"compression {', '.join(methods[k] for k in sorted(methods))}: output error "
                    f"{manifest.plan['compression_error']:.3g} within the budget {options.max_error:g}"
                )
        codec = options.request.codec if options.request else "raw"
        if codec != "raw" and len(best.stages) > 1:
            with timer.step("link codecs"):
                manifest = choose_codecs(
                    captured, workload, manifest, tmp, codec, options.max_error
                )
                checks.append(
                    f"link codecs {', '.join(e.tensors[0].codec if e.tensors else 'raw' for e in manifest.edges[1:-1])}: "
                    f"output error {manifest.plan['measured_error']:.3g} within the budget {options.max_error:g}"
                )
        if options.variants:
            with timer.step("variants"):
                manifest, notes = build_variants(
                    captured,
                    workload,
                    best,
                    topology,
                    manifest,
                    graphs,
                    _stage_backends(best, topology, options.backend),
                    tmp,
                    shared,
                    options.variants,
                    options.max_error,
                    check=options.check,
                    calibration=options.calibration,
                )
                checks += notes
        with timer.step("failover plans"):
            manifest = _with_failover(
                analysed, topology, best, manifest, failover(), tmp, options, timer, shared
            )
        built = sum(1 for e in manifest.failover if e.stages)
        if built:
            checks.append(f"failover: {built} pipeline(s) built beside the primary, weights shared")
        manifest = _final_weight_files(manifest, shared)
        # The manifest is written once, last: a directory without it is not a pipeline.
        (tmp / "manifest.json").write_text(manifest.to_json())
    return manifest, checks


def _make_stages(
    analysed: Analysed,
    topology: Topology,
    plan: Plan,
    tmp: Path,
    options: CompileOptions,
    timer: _Timer,
    shared: SharedWeights,
    folder: str = "",
) -> tuple[list[StageGraph], list[Artifact]]:
    """tag -> slice -> (calibrate, compress) -> build the stages of one plan."""
    captured, workload = analysed.captured, analysed.workload
    backends = _stage_backends(plan, topology, options.backend)
    methods = {s.index: s.precision for s in plan.stages}
    PassManager(
        [TagStages(plan, len(workload.units))],
        dump_ir=options.dump_ir if not folder else None,
        first=ANALYSIS_PASSES + 1,
    ).run(captured.model)
    with timer.step("slice"):
        graphs = slice_stages(captured.model)
    calibration = None
    if any(m in CALIBRATED for m in methods.values()):
        with timer.step("calibrate"):
            calibration = stage_samples(graphs, calibration_inputs(captured, options.calibration))
    if any(m != "fp32" for m in methods.values()):
        with timer.step("compress"):
            graphs = compress_stages(graphs, methods, calibration, options.dump_ir)
    with timer.step("build"):
        artifacts = []
        for graph, stage in zip(graphs, plan.stages):
            artifacts.append(
                backends[stage.index].build(
                    graph,
                    topology.device(stage.device),
                    tmp,
                    check=options.check,
                    folder=f"{folder}stage-{stage.index}",
                    shared=shared,
                )
            )
    return graphs, artifacts


def _with_failover(
    analysed: Analysed,
    topology: Topology,
    best: Plan,
    manifest: Manifest,
    planned: list[Planned],
    tmp: Path,
    options: CompileOptions,
    timer: _Timer,
    shared: SharedWeights,
) -> Manifest:
    """Build each failover plan that differs from the primary under `failover/N/` (a plan
    several cases share is built once) and record every case in the manifest."""
    captured, workload = analysed.captured, analysed.workload
    entries: list[FailoverPlan] = []
    tensors = dict(manifest.tensors)
    built: dict[str, tuple[tuple[StageSpec, ...], tuple[Edge, ...]]] = {}
    for case in planned:
        entry = case.entry()
        plan = case.plan
        if plan is None or plan.text == best.text:
            entries.append(entry)
            continue
        if plan.text not in built:
            folder = f"failover/{len(built)}/"
            # Timed as a whole under "failover plans", not again under slice and build.
            graphs, artifacts = _make_stages(
                analysed, topology, plan, tmp, options, _Timer(None), shared, folder
            )
            pipeline = build_manifest(
                captured,
                workload,
                topology,
                plan,
                graphs,
                artifacts,
                tmp,
                request_context(options),
                shared.files(),
            )
            if any(s.precision != "fp32" for s in plan.stages):
                try:
                    check_compression(captured, pipeline, tmp, options.max_error)
                except AccuracyError as exc:
                    shutil.rmtree(tmp / folder, ignore_errors=True)
                    entries.append(FailoverPlan(case.lost, reason=exc.message))
                    continue
            tensors.update(pipeline.tensors)
            built[plan.text] = (pipeline.stages, pipeline.edges)
        stages, edges = built[plan.text]
        entries.append(replace(entry, stages=stages, edges=edges))
    return replace(manifest, tensors=tensors, failover=tuple(entries))


def _final_weight_files(manifest: Manifest, shared: SharedWeights) -> Manifest:
    """Every stage lists the shared weight files with their final sizes and hashes (the
    files grew while later plans were built); files no stage uses are removed."""
    final = shared.files()
    every = [s for _, stages, _ in manifest.pipelines() for s in stages]
    used = {ref.file for s in every + [v.spec for v in manifest.variants] for ref in s.weights}
    for path in set(final) - used:
        (shared.root / path).unlink(missing_ok=True)

    def refresh(stages: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
        return tuple(replace(s, files=tuple(final.get(f.path, f) for f in s.files)) for s in stages)

    return replace(
        manifest,
        stages=refresh(manifest.stages),
        failover=tuple(replace(e, stages=refresh(e.stages)) for e in manifest.failover),
        variants=tuple(replace(v, spec=refresh((v.spec,))[0]) for v in manifest.variants),
    )


def request_context(options: CompileOptions) -> int:
    """The context length a decoder's KV caches are planned for (0: the model's own)."""
    return options.request.context if options.request else 0


def _stage_backends(best: Plan, topology: Topology, requested: str) -> dict[int, Backend]:
    """The backend that builds each stage, available here and accepting its compression."""
    chosen: dict[int, Backend] = {}
    for stage in best.stages:
        backend = registry.for_device(topology.device(stage.device), requested)
        registry.require_available(backend, f"stage {stage.index} ({stage.device})")
        refused = backend.accepts(stage.precision)
        if refused is not None:
            raise UsageError(
                f"stage {stage.index}: {refused.message} (this stage builds for {backend.name})"
            )
        chosen[stage.index] = backend
    return chosen


class _Timer:
    def __init__(self, steps: object | None) -> None:
        self.steps = steps
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        if self.steps is not None:
            with self.steps.step(name):  # type: ignore[attr-defined]
                yield
        else:
            yield
        # A step run again (a failover plan's build) adds to its time.
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

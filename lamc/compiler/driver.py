"""The compile driver, top to bottom: capture -> passes -> plan -> tag -> slice -> compress
-> build -> manifest -> accuracy checks, written atomically.

Each step is one call you can see here; the algorithms live in the modules it calls. The
CLI and the Python API both go through it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from lamc.atomic import atomic_directory, check_writable
from lamc.backends import registry
from lamc.backends.protocol import Backend
from lamc.backends.slice import SharedWeights, slice_stages
from lamc.compiler.analysis import ANALYSIS_PASSES, Analysed, analyse
from lamc.compiler.codecs import choose_codecs
from lamc.compiler.compression import (
    calibration_inputs,
    check_compression,
    compress_stages,
    stage_samples,
    step_back,
)
from lamc.compiler.failover import default_depth, failover_plans
from lamc.compiler.manifest_build import build_manifest
from lamc.compiler.planning import plan_model, with_compression
from lamc.errors import AccuracyError, DoesNotFitError, UsageError
from lamc.frontend import CaptureOptions
from lamc.manifest import FailoverPlan, Manifest
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
    request = with_compression(options.request or PlanRequest(), options.compress, topology)
    notes: list[str] = []
    while True:
        with timer.step("partition"):
            best, _ = plan_model(analysed, topology, request, backend=options.backend)

        def failover(
            primary: Plan = best, planned: PlanRequest = request
        ) -> tuple[FailoverPlan, ...]:
            depth = default_depth(topology) if options.failover is None else options.failover
            return failover_plans(
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
    failover: Callable[[], tuple[FailoverPlan, ...]] = tuple,
) -> tuple[Manifest, list[str]]:
    """tag -> slice -> compress -> build -> manifest -> accuracy checks, atomically."""
    captured, workload = analysed.captured, analysed.workload
    if not best.budgets_ok:
        broken = "; ".join(
            f"{b.name} {b.value:.4g} vs limit {b.limit:g}" for b in best.budgets if not b.ok
        )
        raise DoesNotFitError(f"the plan breaks a budget: {broken}")
    backends = _stage_backends(best, topology, options.backend)
    methods = {s.index: s.precision for s in best.stages}
    PassManager(
        [TagStages(best, len(workload.units))],
        dump_ir=options.dump_ir,
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
    checks: list[str] = []
    with atomic_directory(out) as tmp, contextlib.closing(SharedWeights(tmp)) as shared:
        with timer.step("build"):
            artifacts = []
            for graph, stage in zip(graphs, best.stages):
                device = topology.device(stage.device)
                artifacts.append(
                    backends[stage.index].build(
                        graph, device, tmp, check=options.check, shared=shared
                    )
                )
                if options.check:
                    checks.append(
                        f"stage {stage.index}: passes onnx.checker (full) and loads in ONNX Runtime"
                    )
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
        with timer.step("failover plans"):
            manifest = replace(manifest, failover=failover())
        # The manifest is written once, last: a directory without it is not a pipeline.
        (tmp / "manifest.json").write_text(manifest.to_json())
    return manifest, checks


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
        self.seconds[name] = time.perf_counter() - started

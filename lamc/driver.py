"""The compile driver, top to bottom: capture -> passes -> plan -> slice -> build -> manifest.

Each step is one call you can see here; the CLI and the Python API both go through it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamc.errors import AccuracyError
from lamc.frontend import Captured, CaptureOptions, capture
from lamc.workload import Workload

if TYPE_CHECKING:
    from types import ModuleType

    from lamc.manifest import Manifest
    from lamc.passes.partition.planner import PlanRequest
    from lamc.plan import Plan
    from lamc.topology import Topology


@dataclass
class Analysed:
    captured: Captured
    workload: Workload
    seconds: dict[str, float] = field(default_factory=dict)
    granularity: str = "block"


def analyse(
    ref: str,
    options: CaptureOptions | None = None,
    *,
    dump_ir: Path | None = None,
    captured: Captured | None = None,
    granularity: str = "block",
) -> Analysed:
    """Capture MODEL and run the analysis passes: the workload the partitioner needs."""
    from lamc.passes.analyze import Analyze
    from lamc.passes.base import PassManager
    from lamc.passes.units import BuildUnits

    seconds: dict[str, float] = {}
    if captured is None:
        started = time.perf_counter()
        captured = capture(ref, options)
        seconds["capture"] = time.perf_counter() - started
    started = time.perf_counter()
    manager = PassManager(
        [Analyze(captured.operating_point), BuildUnits(captured.name, granularity=granularity)],
        dump_ir=dump_ir,
    )
    manager.run(captured.model)
    seconds["analyse"] = time.perf_counter() - started
    workload: Workload = captured.model.meta["lamc.workload"]
    workload = attach_kv_bytes(captured, workload)
    return Analysed(captured, workload, seconds, granularity)


def attach_kv_bytes(captured: Captured, workload: Workload) -> Workload:
    """A decoder's KV cache per token and sequence, charged to the unit of each layer's
    attention (the unit that reads the layer's past keys): what planning with `--context`
    adds to each stage's memory."""
    from dataclasses import replace

    import numpy as np

    from lamc.ir import annotation

    kv = captured.kv_cache
    if kv is None:
        return workload
    inputs = {v.name: v for v in captured.model.graph.inputs}
    extra = [0] * len(workload.units)
    names = [u.name for u in workload.units]
    for layer, (key, value) in enumerate(kv.past_inputs):
        scope = kv.layer_scopes[layer] if layer < len(kv.layer_scopes) else ""
        for name in (key, value):
            tensor = inputs.get(name)
            if tensor is None:
                continue
            users = [annotation(use.node, "lamc.unit") for use in tensor.uses()]
            readers = sorted({u for u in users if isinstance(u, int)})
            if not readers:
                continue
            # The layer's own unit (other units may read only the past length).
            own = [u for u in readers if scope and scope in names[u].split("+")[0]]
            readers = own or readers[-1:]
            itemsize = np.dtype(tensor.dtype.numpy()).itemsize if tensor.dtype else 4
            extra[readers[0]] += kv.kv_heads * kv.head_dim * itemsize
    units = tuple(
        replace(u, kv_bytes_per_token=u.kv_bytes_per_token + extra[u.index]) for u in workload.units
    )
    # The caches stay in their stages (lamc.runtime.kvcache): no link carries them.
    resident = frozenset(n for pair in (*kv.past_inputs, *kv.present_outputs) for n in pair)
    return replace(workload, units=units, resident=resident)


def prepare_request(request: PlanRequest, analysed: Analysed) -> PlanRequest:
    """Resolve objective `auto` (generate for a decoder with its KV cache, else
    throughput) and give objective `generate` the decode step's workload."""
    from dataclasses import replace

    from lamc.passes.partition.planner import GENERATE, THROUGHPUT

    objective = request.objective
    if objective == "auto":
        objective = GENERATE if analysed.captured.kv_cache is not None else THROUGHPUT
    if objective == GENERATE and request.decode is None:
        return replace(
            request, objective=objective, decode=decode_workload(analysed, request.context)
        )
    return replace(request, objective=objective)


def decode_workload(analysed: Analysed, context: int = 0) -> Workload:
    """The workload of one decode step of a decoder: one new token per sequence against a
    cache of half the planned context (the average over a generation). The same units
    as the prefill workload, so the two cost tables add up entry by entry."""
    from lamc.errors import UsageError
    from lamc.passes.analyze import Analyze
    from lamc.passes.base import PassManager
    from lamc.passes.units import BuildUnits

    captured, prefill = analysed.captured, analysed.workload
    kv = captured.kv_cache
    if kv is None:
        raise UsageError(
            "--objective generate needs a decoder captured with its KV cache (for the zoo: kv=1)"
        )
    binding = dict(captured.operating_point)
    seq = next((d for d in binding if d not in (kv.past_dim, "batch")), None)
    if seq is not None:
        binding[seq] = 1
    low, high = captured.dims.get(kv.past_dim, (0, kv.max_context))
    binding[kv.past_dim] = min(max((context or kv.max_context) // 2, low), high)
    granularity = analysed.granularity
    model = captured.model
    saved = model.meta.get("lamc.workload")
    try:
        PassManager([Analyze(binding), BuildUnits(captured.name, granularity=granularity)]).run(
            model
        )
        step: Workload = model.meta["lamc.workload"]
    finally:
        # The IR's annotations go back to the operating point the rest of the compile uses.
        PassManager(
            [Analyze(captured.operating_point), BuildUnits(captured.name, granularity=granularity)]
        ).run(model)
        if saved is not None:
            model.meta["lamc.workload"] = saved
    if [u.name for u in step.units] != [u.name for u in prefill.units]:
        from lamc.errors import InternalError

        raise InternalError("the decode step's units differ from the prefill's")
    return attach_kv_bytes(captured, step)


# ------------------------------------------------------------------------------ compile


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
    """capture -> passes -> plan -> tag -> slice -> build -> manifest, written atomically.

    With `--compress auto`, a plan whose compression breaks the accuracy budget is planned
    again with its least precise method taken from that device, until it holds."""
    from lamc.errors import UsageError
    from lamc.passes.partition.planner import PlanRequest, plan
    from lamc.topology import load_topology

    options = options or CompileOptions()
    timer = _Timer(steps)
    topology = load_topology(topology_path)
    with timer.step("capture and analyse"):
        if analysed is None:
            analysed = analyse(
                ref, options.capture, dump_ir=options.dump_ir, granularity=options.granularity
            )
    captured, workload = analysed.captured, analysed.workload
    if not captured.has_weights:
        raise UsageError(
            "a shapes-only capture (--no-weights) cannot be compiled: the stages need the weights"
        )
    request = prepare_request(options.request or PlanRequest(), analysed)
    if options.compress:
        from dataclasses import replace

        from lamc.precision import CompressionError, resolve_methods

        try:
            request = replace(request, methods=resolve_methods(options.compress, topology))
        except CompressionError as exc:
            raise UsageError(str(exc)) from None
    notes: list[str] = []
    while True:
        with timer.step("partition"):
            best, _ = plan(workload, topology, request)
        try:
            manifest, checks = _build_pipeline(
                captured, workload, topology, best, out, options, request, timer
            )
        except AccuracyError as exc:
            request = _step_back(options.compress, request, best, exc, notes)
            continue
        return CompileResult(out, manifest, best, timer.seconds, notes + checks)


def _step_back(
    spec: str | None, request: PlanRequest, best: Plan, exc: AccuracyError, notes: list[str]
) -> PlanRequest:
    """`--compress auto` broke the accuracy budget: take the least precise method of the
    plan away from its device and plan again (never past fp32, so this ends)."""
    from dataclasses import replace

    from lamc.cost import PRECISION_ORDER

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


def _build_pipeline(
    captured: Captured,
    workload: Workload,
    topology: Topology,
    best: Plan,
    out: Path,
    options: CompileOptions,
    request: PlanRequest,
    timer: _Timer,
) -> tuple[Manifest, list[str]]:
    """tag -> slice -> (calibrate) -> build -> manifest -> accuracy checks, atomically."""
    from lamc.atomic import atomic_directory
    from lamc.passes.partition.tag import TagStages, unit_stages

    if not best.budgets_ok:
        from lamc.errors import DoesNotFitError

        broken = "; ".join(
            f"{b.name} {b.value:.4g} vs limit {b.limit:g}" for b in best.budgets if not b.ok
        )
        raise DoesNotFitError(f"the plan breaks a budget: {broken}")
    stage_of_unit = unit_stages(best, len(workload.units))
    TagStages(best, len(workload.units))(captured.model)
    backends = _choose_backends(best, topology, options.backend)
    _check_support(captured, best, backends)
    methods = _compression(best, backends)
    with timer.step("slice"):
        from lamc.backends.slice import slice_stages

        graphs = slice_stages(captured.model, stage_of_unit, len(best.stages))
    checks: list[str] = []
    from lamc.passes.compress import CALIBRATED

    calibration = None
    if any(m in CALIBRATED for m in methods.values()):
        with timer.step("calibrate"):
            calibration = stage_samples(graphs, calibration_inputs(captured, options.calibration))
    with atomic_directory(out) as tmp:
        artifacts = []
        with timer.step("build"):
            for graph, stage in zip(graphs, best.stages):
                extra: dict[str, Any] = {}
                if methods[stage.index] != "fp32":
                    extra["compression"] = methods[stage.index]
                if calibration is not None:
                    extra["calibration"] = calibration[stage.index]
                artifact = backends[stage.index].build(
                    graph, topology.device(stage.device), tmp, check=options.check, **extra
                )
                artifacts.append(artifact)
                if options.check:
                    checks.append(
                        f"stage {stage.index}: passes onnx.checker (full) and loads in ONNX Runtime"
                    )
        with timer.step("manifest"):
            from lamc.manifest_build import build_manifest

            manifest = build_manifest(
                captured, workload, topology, best, graphs, artifacts, tmp, request.context
            )
            if any(m != "fp32" for m in methods.values()):
                from dataclasses import replace

                manifest = replace(
                    manifest,
                    stages=tuple(replace(s, precision=methods[s.index]) for s in manifest.stages),
                )
            (tmp / "manifest.json").write_text(manifest.to_json())
        if any(m != "fp32" for m in methods.values()):
            with timer.step("accuracy"):
                manifest = check_compression(captured, manifest, tmp, options.max_error)
                (tmp / "manifest.json").write_text(manifest.to_json())
                checks.append(
                    f"compression {', '.join(methods[k] for k in sorted(methods))}: output error "
                    f"{manifest.plan['compression_error']:.3g} within the budget {options.max_error:g}"
                )
        if request.codec != "raw" and len(best.stages) > 1:
            with timer.step("link codecs"):
                manifest = choose_codecs(
                    captured, workload, manifest, tmp, request.codec, options.max_error
                )
                (tmp / "manifest.json").write_text(manifest.to_json())
                checks.append(
                    f"link codecs {', '.join(e.tensors[0].codec if e.tensors else 'raw' for e in manifest.edges[1:-1])}: "
                    f"output error {manifest.plan['measured_error']:.3g} within the budget {options.max_error:g}"
                )
    return manifest, checks


def _choose_backends(best: Plan, topology: Topology, requested: str) -> dict[int, ModuleType]:
    """The build module for each stage: the device's first backend lamc can build here."""
    import importlib

    from lamc.errors import RuntimeEnvironmentError, UsageError

    chosen: dict[int, ModuleType] = {}
    for stage in best.stages:
        device = topology.device(stage.device)
        if requested == "onnxruntime" or (
            requested == "auto" and any(b.startswith("onnxruntime") for b in device.backends)
        ):
            if not any(b.startswith("onnxruntime") for b in device.backends):
                raise UsageError(
                    f"--backend onnxruntime: device {device.name} lists no onnxruntime backend ({', '.join(device.backends)})"
                )
            chosen[stage.index] = importlib.import_module("lamc.backends.onnxruntime.build")
        elif requested in ("tensorrt", "auto"):
            module = importlib.import_module("lamc.backends.tensorrt.build")
            if "tensorrt" not in device.backends:
                raise UsageError(f"--backend tensorrt: device {device.name} does not list tensorrt")
            if not module.is_available():
                raise RuntimeEnvironmentError(
                    f"stage {stage.index} ({device.name}) needs TensorRT, which is not installed here",
                    hint="pip install 'lamc[tensorrt]' on a machine with an NVIDIA GPU, or choose --backend onnxruntime",
                )
            chosen[stage.index] = module
        else:
            raise UsageError(f"unknown backend {requested!r}")
    return chosen


def _check_support(captured: Captured, best: Plan, backends: dict[int, ModuleType]) -> None:
    from lamc.errors import UnsupportedOpError
    from lamc.ir import STAGE, annotation, user_frame

    for node in captured.model.graph:
        stage = annotation(node, STAGE)
        reason = backends[stage].supports(node)
        if reason is not None:
            where = user_frame(node)
            raise UnsupportedOpError(
                f"stage {stage} ({best.stages[stage].device}): {reason}"
                + (f" (from {where})" if where else ""),
                hint="pin this unit to a device whose backend supports it, or use another backend",
            )


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


# ----------------------------------------------------------------------------- codecs

LOSSY_CODECS = ("int8", "fp16")  # most compressive first


def output_error(
    pipeline: Any,
    reference: Any,
    cases: list[tuple[str, dict[str, Any]]],
) -> float:
    """Max over cases and outputs of max |out - ref| / max |ref| (normwise relative error)."""
    import numpy as np

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
    from dataclasses import replace

    from lamc.errors import AccuracyError
    from lamc.manifest import EdgeTensor
    from lamc.runtime.executor import Pipeline
    from lamc.runtime.wire import encoded_bytes
    from lamc.validate import inputs_for

    if captured.reference is None:
        raise AccuracyError("lossy link codecs need the model's weights to measure their error")
    pipeline = Pipeline.open(out)
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
    plan = {**manifest.plan, "codec": codec, "max_error": max_error, "measured_error": error}
    return replace(manifest, edges=tuple(edges), plan=plan)


# ------------------------------------------------------------------------ compression


def _compression(best: Plan, backends: dict[int, ModuleType]) -> dict[int, str]:
    """Stage index -> compression method, as the plan chose (fp32 without --compress)."""
    from lamc.errors import UsageError

    methods = {s.index: s.precision for s in best.stages}
    for index, method in methods.items():
        if method != "fp32" and backends[index].NAME != "onnxruntime":
            raise UsageError(
                f"stage {index}: --compress {method} needs the onnxruntime backend "
                f"(this stage builds for {backends[index].NAME})"
            )
    return methods


def check_compression(
    captured: Captured, manifest: Manifest, out: Path, max_error: float
) -> Manifest:
    """Measure the compressed pipeline's output error against the source model on
    calibration inputs; over `max_error` is an accuracy error (exit 7)."""
    from dataclasses import replace

    from lamc.errors import AccuracyError
    from lamc.runtime.executor import Pipeline
    from lamc.validate import inputs_for

    if captured.reference is None:
        raise AccuracyError("compression needs the model's weights to measure its error")
    cases = inputs_for(captured, manifest, samples=2, seed=1)
    error = output_error(Pipeline.open(out), captured.reference, cases)
    if error > max_error:
        stages = ", ".join(f"stage {s.index} {s.precision}" for s in manifest.stages)
        raise AccuracyError(
            f"compression ({stages}) puts the model outputs {error:.3g} (relative) from the source model, over the budget --max-error {max_error:g}",
            hint="compress less (fp16, or fp32 on some devices: --compress gpu=fp16,cpu=fp32) or raise --max-error",
        )
    plan = {**manifest.plan, "max_error": max_error, "compression_error": error}
    return replace(manifest, plan=plan)


def calibration_inputs(
    captured: Captured, path: Path | None, count: int = 16
) -> list[dict[str, Any]]:
    """Input samples for static quantisation: from an .npz (`NAME` for one sample, or
    `K/NAME` for sample K), else generated in the dynamic ranges at the operating point."""
    import numpy as np

    from lamc.errors import UsageError
    from lamc.frontend import random_inputs

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
    from lamc.backends.onnxruntime.run import new_session

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

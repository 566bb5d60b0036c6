"""Measure this machine with ONNX Runtime, for the cost model (`lamc profile`).

Each probe is a small ONNX model of one op (or a chain of ops) at a size typical of real
models. Its FLOPs and bytes come from lamc's own analysis pass, so the profile and the
model use one definition of work. From the timings:

- call overhead: one session.run of a trivial graph;
- op overhead: the extra time per op of a chain of tiny ops;
- peak FLOP/s per dtype: the best GEMM rate (fp32 MatMul, int8 MatMulInteger, 4-bit
  MatMulNBits), overheads removed;
- memory bandwidth: the best rate of a large element-wise Add (bytes read + written);
- efficiency per op class: the fraction of the roofline (max of FLOPs at peak, bytes at
  bandwidth) that the class's probes reach, as total roofline time over total measured
  time (overheads removed), so larger probes weigh more, as they do in a model.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from lamc.ir import COST, annotation
from lamc.passes.analyze import Analyze
from lamc.quantity import format_bytes

FLOAT = TensorProto.FLOAT


@dataclass
class Probe:
    name: str
    op_class: str
    dtype: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    ops: int = 1
    flops: float = 0.0
    moved_bytes: float = 0.0
    weight_bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class DeviceProfile:
    name: str
    host: str
    kind: str
    memory_bytes: float
    peak_flops: dict[str, float]
    memory_bandwidth: float
    cache_bytes: float
    cache_bandwidth: float
    efficiency: dict[str, dict[str, float]]
    class_overhead_ms: dict[str, float]
    op_overhead_ms: float
    call_overhead_ms: float
    providers: list[str]
    threads: int
    probes: list[Probe] = field(default_factory=list)

    def to_yaml(self) -> str:
        """A device entry that a topology can `include:`."""
        lines = [
            "# A device measured by `lamc profile` with ONNX Runtime",
            f"# ({platform.machine()}, {os.cpu_count()} CPUs, providers {', '.join(self.providers)}, {self.threads or 'default'} threads).",
            "# Include it from a topology:  devices: [{include: this-file.yaml, name: NAME, host: HOST}]",
            "lamc_device: 1",
            f"name: {self.name}",
            f"host: {self.host}",
            f"kind: {self.kind}",
            f"memory: {self.memory_bytes / 2**30:.2f}GiB",
            f"memory_bandwidth: {self.memory_bandwidth / 1e9:.2f}GB/s",
        ]
        if self.cache_bytes:
            lines.append(
                f"cache: {{size: {self.cache_bytes / 2**20:.0f}MiB, bandwidth: {self.cache_bandwidth / 1e9:.2f}GB/s}}"
            )
        lines += ["peak:"]
        for dtype, rate in self.peak_flops.items():
            lines.append(f"  {dtype}: {rate / 1e9:.1f}GFLOPS")
        lines.append("efficiency:")
        for dtype, table in self.efficiency.items():
            entries = ", ".join(f"{k}: {v:.3f}" for k, v in table.items())
            lines.append(f"  {dtype}: {{{entries}}}")
        overheads = ", ".join(
            [f"default: {self.op_overhead_ms * 1000:.2f}us"]
            + [f"{k}: {v * 1000:.2f}us" for k, v in self.class_overhead_ms.items()]
        )
        lines += [
            f"op_overhead: {{{overheads}}}",
            f"call_overhead: {self.call_overhead_ms * 1000:.2f}us",
            "backends: [onnxruntime]"
            if self.kind == "cpu"
            else "backends: [onnxruntime-cuda, onnxruntime]",
        ]
        return "\n".join(lines) + "\n"


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, list[int]]],
    outputs: Sequence[tuple[Any, ...]],
    initializers: list[onnx.TensorProto] | None = None,
    ms: bool = False,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(o[0], o[1], o[2] if len(o) > 2 else None) for o in outputs],
        initializer=initializers or [],
    )
    opsets = [helper.make_opsetid("", 18)] + (
        [helper.make_opsetid("com.microsoft", 1)] if ms else []
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _matmul(m: int, k: int, n: int, batch: tuple[int, ...] = ()) -> Probe:
    rng = _rng()
    w = (
        numpy_helper.from_array(rng.standard_normal((*batch, k, n)).astype(np.float32) * 0.01, "w")
        if not batch
        else None
    )
    if batch:
        feeds = {
            "a": rng.standard_normal((*batch, m, k)).astype(np.float32),
            "b": rng.standard_normal((*batch, k, n)).astype(np.float32),
        }
        model = _model(
            [helper.make_node("MatMul", ["a", "b"], ["y"])],
            [("a", FLOAT, [*batch, m, k]), ("b", FLOAT, [*batch, k, n])],
            [("y", FLOAT)],
        )
    else:
        feeds = {"a": rng.standard_normal((m, k)).astype(np.float32)}
        model = _model(
            [helper.make_node("MatMul", ["a", "w"], ["y"])],
            [("a", FLOAT, [m, k])],
            [("y", FLOAT)],
            [w] if w is not None else [],
        )
    return Probe(
        f"MatMul {'x'.join(map(str, batch)) + 'x' if batch else ''}{m}x{k}x{n}",
        "matmul",
        "fp32",
        model,
        feeds,
    )


def _matmul_int8(m: int, k: int, n: int) -> Probe:
    rng = _rng()
    w = numpy_helper.from_array(rng.integers(-64, 64, (k, n)).astype(np.int8), "w")
    feeds = {"a": rng.integers(0, 255, (m, k)).astype(np.uint8)}
    model = _model(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        [("a", TensorProto.UINT8, [m, k])],
        [("y", TensorProto.INT32)],
        [w],
    )
    return Probe(f"MatMulInteger {m}x{k}x{n}", "matmul", "int8", model, feeds)


def _matmul_nbits(m: int, k: int, n: int, block: int = 32) -> Probe:
    rng = _rng()
    blocks = k // block
    packed = numpy_helper.from_array(
        rng.integers(0, 255, (n, blocks, block // 2)).astype(np.uint8), "b"
    )
    scales = numpy_helper.from_array((rng.random(n * blocks).astype(np.float32) + 0.5) * 0.01, "s")
    node = helper.make_node(
        "MatMulNBits",
        ["a", "b", "s"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
    )
    # A contrib op: ONNX shape inference does not know it, so the output shape is stated.
    model = _model(
        [node], [("a", FLOAT, [m, k])], [("y", FLOAT, [m, n])], [packed, scales], ms=True
    )
    return Probe(
        f"MatMulNBits(4) {m}x{k}x{n}",
        "matmul",
        "int4",
        model,
        {"a": rng.standard_normal((m, k)).astype(np.float32)},
    )


def _conv(c_in: int, c_out: int, size: int, kernel: int, stride: int = 1) -> Probe:
    rng = _rng()
    w = numpy_helper.from_array(
        rng.standard_normal((c_out, c_in, kernel, kernel)).astype(np.float32) * 0.01, "w"
    )
    pad = kernel // 2
    node = helper.make_node(
        "Conv",
        ["x", "w"],
        ["y"],
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pad] * 4,
    )
    model = _model([node], [("x", FLOAT, [1, c_in, size, size])], [("y", FLOAT)], [w])
    return Probe(
        f"Conv {kernel}x{kernel} {c_in}->{c_out} @{size}",
        "conv",
        "fp32",
        model,
        {"x": rng.standard_normal((1, c_in, size, size)).astype(np.float32)},
    )


def _unary(op: str, shape: list[int], op_class: str, **attrs: Any) -> Probe:
    rng = _rng()
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    model = _model([node], [("x", FLOAT, shape)], [("y", FLOAT)])
    return Probe(
        f"{op} {'x'.join(map(str, shape))}",
        op_class,
        "fp32",
        model,
        {"x": rng.standard_normal(shape).astype(np.float32)},
    )


def _binary(op: str, shape: list[int]) -> Probe:
    rng = _rng()
    model = _model(
        [helper.make_node(op, ["x", "z"], ["y"])],
        [("x", FLOAT, shape), ("z", FLOAT, shape)],
        [("y", FLOAT)],
    )
    feeds = {
        "x": rng.standard_normal(shape).astype(np.float32),
        "z": rng.standard_normal(shape).astype(np.float32) + 3,
    }
    return Probe(f"{op} {'x'.join(map(str, shape))}", "elementwise", "fp32", model, feeds)


def _layernorm(rows: int, width: int) -> Probe:
    rng = _rng()
    scale = numpy_helper.from_array(np.ones(width, np.float32), "g")
    bias = numpy_helper.from_array(np.zeros(width, np.float32), "b")
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)
    model = _model([node], [("x", FLOAT, [rows, width])], [("y", FLOAT)], [scale, bias])
    return Probe(
        f"LayerNormalization {rows}x{width}",
        "norm",
        "fp32",
        model,
        {"x": rng.standard_normal((rows, width)).astype(np.float32)},
    )


def _batchnorm(channels: int, size: int) -> Probe:
    rng = _rng()
    inits = [
        numpy_helper.from_array(v, n)
        for n, v in (
            ("s", np.ones(channels, np.float32)),
            ("b", np.zeros(channels, np.float32)),
            ("m", np.zeros(channels, np.float32)),
            ("v", np.ones(channels, np.float32)),
        )
    ]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])
    model = _model([node], [("x", FLOAT, [1, channels, size, size])], [("y", FLOAT)], inits)
    return Probe(
        f"BatchNormalization {channels}@{size}",
        "norm",
        "fp32",
        model,
        {"x": rng.standard_normal((1, channels, size, size)).astype(np.float32)},
    )


def _gather(vocab: int, width: int, tokens: int) -> Probe:
    rng = _rng()
    table = numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "t")
    model = _model(
        [helper.make_node("Gather", ["t", "i"], ["y"])],
        [("i", TensorProto.INT64, [1, tokens])],
        [("y", FLOAT)],
        [table],
    )
    return Probe(
        f"Gather {vocab}x{width}[{tokens}]",
        "data",
        "fp32",
        model,
        {"i": rng.integers(0, vocab, (1, tokens)).astype(np.int64)},
    )


def _concat(shape: list[int]) -> Probe:
    rng = _rng()
    model = _model(
        [helper.make_node("Concat", ["x", "z"], ["y"], axis=-1)],
        [("x", FLOAT, shape), ("z", FLOAT, shape)],
        [("y", FLOAT)],
    )
    return Probe(
        f"Concat {'x'.join(map(str, shape))}",
        "data",
        "fp32",
        model,
        {
            "x": rng.standard_normal(shape).astype(np.float32),
            "z": rng.standard_normal(shape).astype(np.float32),
        },
    )


def _chain(length: int) -> Probe:
    inits = [
        numpy_helper.from_array(np.full(16, 1e-3 * (i + 1), np.float32), f"c{i}")
        for i in range(length)
    ]
    nodes = [
        helper.make_node(
            "Add", ["x" if i == 0 else f"t{i - 1}", f"c{i}"], [f"t{i}" if i < length - 1 else "y"]
        )
        for i in range(length)
    ]
    model = _model(nodes, [("x", FLOAT, [16])], [("y", FLOAT)], inits)
    return Probe(
        f"{length} tiny Adds", "overhead", "fp32", model, {"x": np.ones(16, np.float32)}, ops=length
    )


def probes() -> list[Probe]:
    """Sizes typical of transformer and CNN layers at batch 1."""
    return [
        _matmul(128, 768, 768),
        _matmul(128, 768, 2304),
        _matmul(128, 768, 3072),
        _matmul(128, 3072, 768),
        _matmul(197, 768, 3072),
        _matmul(128, 2048, 2048),
        _matmul(512, 1024, 4096),
        _matmul(1, 768, 3072),
        _matmul(128, 64, 128, batch=(12,)),
        _matmul(128, 128, 64, batch=(12,)),
        _matmul_int8(128, 768, 3072),
        _matmul_int8(512, 1024, 4096),
        _matmul_nbits(128, 768, 3072),
        _matmul_nbits(512, 1024, 4096),
        _conv(64, 64, 56, 3),
        _conv(256, 64, 56, 1),
        _conv(64, 256, 56, 1),
        _conv(128, 128, 28, 3),
        _conv(512, 512, 7, 3),
        _conv(3, 64, 224, 7, stride=2),
        _binary("Add", [1 << 24]),
        _binary("Add", [128, 3072]),
        _binary("Mul", [128, 768]),
        _binary("Add", [1, 256, 56, 56]),
        _unary("Relu", [1, 256, 56, 56], "elementwise"),
        _unary("Erf", [128, 3072], "elementwise"),
        _unary("Tanh", [128, 3072], "elementwise"),
        _layernorm(128, 768),
        _layernorm(197, 768),
        _unary("Softmax", [1, 12, 128, 128], "norm", axis=-1),
        _batchnorm(256, 56),
        _unary("ReduceMean", [128, 768], "norm", keepdims=1),
        _unary("GlobalAveragePool", [1, 2048, 7, 7], "norm"),
        _unary(
            "MaxPool",
            [1, 64, 112, 112],
            "norm",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        _unary("Transpose", [1, 128, 12, 64], "data", perm=[0, 2, 1, 3]),
        _concat([1, 12, 128, 64]),
        _gather(50257, 768, 128),
    ]


def _analyse(probe: Probe) -> None:
    model = ir.from_proto(probe.model)
    Analyze({})(model)
    costs = [annotation(n, COST) for n in model.graph]
    probe.flops = float(sum(c.flops for c in costs))
    probe.moved_bytes = float(sum(c.moved_bytes for c in costs))
    probe.weight_bytes = float(sum(c.weight_read_bytes for c in costs))


def _time(probe: Probe, options: Any, providers: list[str], budget_s: float) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(
        probe.model.SerializeToString(), sess_options=options, providers=providers
    )
    run: Callable[[], Any] = lambda: session.run(None, probe.feeds)  # noqa: E731
    for _ in range(3):
        run()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 7 or (time.perf_counter() < deadline and len(samples) < 200):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def profile_machine(
    *,
    name: str | None = None,
    host: str | None = None,
    provider: str = "cpu",
    threads: int = 0,
    budget_s: float = 0.4,
    rounds: int = 2,
    progress: Callable[[str], None] | None = None,
) -> DeviceProfile:
    """Measure this machine. Each probe's time is the median of its runs, and the best such
    median over `rounds` passes: interference from other work only ever adds time."""
    from lamc.backends.onnxruntime.run import check_providers, session_options

    providers = check_providers(
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if provider == "cuda"
        else ["CPUExecutionProvider"]
    )
    options = session_options(threads=threads, optimization="all")
    # Call overhead: a graph that does (almost) nothing.
    trivial = _unary("Identity", [1], "overhead")
    call_s = _time(trivial, options, providers, budget_s)
    chain = _chain(64)
    op_s = max((_time(chain, options, providers, budget_s) - call_s) / chain.ops, 0.0)

    measured: list[Probe] = []
    candidates = probes()
    for round_index in range(rounds):
        for probe in candidates:
            if progress:
                progress(probe.name)
            try:
                seconds = _time(probe, options, providers, budget_s)
            except Exception:
                probe.seconds = math.nan  # an op this build of ONNX Runtime lacks (a contrib op)
                continue
            probe.seconds = seconds if round_index == 0 else min(probe.seconds, seconds)
    for probe in candidates:
        if math.isnan(probe.seconds) or probe.seconds <= 0:
            continue
        _analyse(probe)
        if probe.flops > 0 or probe.moved_bytes > 0:
            measured.append(probe)

    def busy(p: Probe) -> float:
        return max(p.seconds - call_s - op_s * p.ops, 1e-9)

    peak: dict[str, float] = {}
    for dtype in ("fp32", "fp16", "int8", "int4"):
        rates = [p.flops / busy(p) for p in measured if p.op_class == "matmul" and p.dtype == dtype]
        if rates:
            peak[dtype] = max(rates)
    cache_bytes = _cache_bytes()
    streams = [p for p in measured if p.op_class == "elementwise"]
    # Memory bandwidth from element-wise probes far larger than the cache, cache
    # bandwidth from those that fit in it.
    big = [p for p in streams if p.moved_bytes > 2 * cache_bytes] or streams
    bandwidth = max(p.moved_bytes / busy(p) for p in big)
    small = [p for p in streams if p.moved_bytes <= cache_bytes] if cache_bytes else []
    cache_bandwidth = max((p.moved_bytes / busy(p) for p in small), default=0.0)
    if cache_bandwidth <= bandwidth:
        cache_bytes = cache_bandwidth = 0.0

    from lamc.cost import op_time
    from lamc.topology import Device

    ideal = Device(
        name="probe",
        host="probe",
        kind="cpu",
        memory_bytes=1.0,
        peak_flops=peak,
        memory_bandwidth=bandwidth,
        backends=("onnxruntime",),
        efficiency={
            d: dict.fromkeys(("matmul", "conv", "elementwise", "norm", "data"), 1.0) for d in peak
        },
        op_overhead_ms=0.0,
        call_overhead_ms=0.0,
        runtime_memory_bytes=0.0,
        cache_bytes=cache_bytes,
        cache_bandwidth=cache_bandwidth,
    )
    # Launch cost per op class, measured on tiny ops of the class (a GEMM or a conv also
    # pays for its thread-pool dispatch and layout work); other classes pay the chain's.
    class_overhead: dict[str, float] = {}
    for op_class, tiny in (("matmul", _matmul(4, 16, 16)), ("conv", _conv(8, 8, 8, 3))):
        class_overhead[op_class] = (
            max(_time(tiny, options, providers, budget_s) - call_s, op_s) * 1000
        )
    efficiency: dict[str, dict[str, float]] = {}
    for dtype in ("fp32", "int8", "int4"):
        if dtype not in peak:
            continue
        table: dict[str, float] = {}
        for op_class in ("matmul", "conv", "elementwise", "norm", "data"):
            group = [p for p in measured if p.op_class == op_class and p.dtype == dtype]
            if not group:
                continue
            overhead_s = class_overhead.get(op_class, op_s * 1000) / 1000
            roofline_s = sum(
                op_time(
                    ideal,
                    op_class,
                    p.flops,
                    p.moved_bytes,
                    dtype,
                    p.weight_bytes,
                    weights_cached=p.weight_bytes <= cache_bytes,
                ).total_ms
                / 1000
                for p in group
            )
            busy_s = sum(max(p.seconds - call_s - overhead_s * p.ops, 1e-9) for p in group)
            table[op_class] = min(max(roofline_s / busy_s, 0.005), 1.0)
        efficiency[dtype] = table
    import socket

    hostname = socket.gethostname()
    return DeviceProfile(
        name=name or hostname,
        host=host or hostname,
        kind="gpu" if provider == "cuda" else "cpu",
        memory_bytes=_memory_bytes(),
        peak_flops=peak,
        memory_bandwidth=bandwidth,
        cache_bytes=cache_bytes,
        cache_bandwidth=cache_bandwidth,
        efficiency=efficiency,
        class_overhead_ms=class_overhead,
        op_overhead_ms=op_s * 1000,
        call_overhead_ms=call_s * 1000,
        providers=providers,
        threads=threads,
        probes=measured,
    )


def _cache_bytes() -> float:
    """The last-level cache, from sysfs (0 where unknown)."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(e for e in os.listdir(base) if e.startswith("index"))
    except OSError:
        return 0.0
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return float(max(sizes, default=0))


def _memory_bytes() -> float:
    """Memory lamc may plan to use here: 80% of the machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return 0.8 * int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return 0.8 * pages * os.sysconf("SC_PAGE_SIZE") if pages else 8 * 2**30


def describe(profile: DeviceProfile) -> list[str]:
    rows = [f"{'probe':36} {'class':12} {'dtype':6} {'ms':>9} {'GFLOP/s':>9} {'GB/s':>8}"]
    for p in profile.probes:
        rows.append(
            f"{p.name:36} {p.op_class:12} {p.dtype:6} {p.seconds * 1000:9.3f} {p.flops / p.seconds / 1e9:9.1f} {p.moved_bytes / p.seconds / 1e9:8.2f}"
        )
    peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in profile.peak_flops.items())
    rows.append(
        f"peak: {peaks}; memory bandwidth {profile.memory_bandwidth / 1e9:.2f} GB/s; memory {format_bytes(profile.memory_bytes)}"
    )
    if profile.cache_bytes:
        rows.append(
            f"cache: {format_bytes(profile.cache_bytes)} at {profile.cache_bandwidth / 1e9:.2f} GB/s"
        )
    rows.append(
        f"overhead: {profile.call_overhead_ms * 1000:.1f} us per call, {profile.op_overhead_ms * 1000:.2f} us per op; by class: "
        + ", ".join(f"{k} {v * 1000:.1f} us" for k, v in profile.class_overhead_ms.items())
    )
    for dtype, table in profile.efficiency.items():
        rows.append(f"efficiency {dtype}: " + ", ".join(f"{k} {v:.2f}" for k, v in table.items()))
    if not math.isfinite(profile.memory_bandwidth):
        rows.append("warning: memory bandwidth could not be measured")
    return rows

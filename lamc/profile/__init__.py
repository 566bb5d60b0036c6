"""Measure this machine with ONNX Runtime, for the cost model (`lamc profile`).

probes (the models) -> timing (medians, best of rounds) -> fitting (peaks, bandwidths,
efficiencies, overheads) -> writer (a topology entry).

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
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

from lamc.backends.onnxruntime.run import check_providers, session_options
from lamc.cost import op_time
from lamc.profile.host import cache_bytes, cpu_quota, memory_bytes, training_runtime_bytes
from lamc.profile.model import DeviceProfile
from lamc.profile.probes import Probe, analyse, chain, conv, matmul, probes, unary
from lamc.profile.report import describe
from lamc.topology import Device

__all__ = ["DeviceProfile", "Probe", "describe", "profile_machine"]


def time_probe(probe: Probe, options: Any, providers: list[str], budget_s: float) -> float:
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
    sustain_s: float = 2.0,
) -> DeviceProfile:
    """Measure this machine. Each probe's time is the median of its runs, and the best such
    median over `rounds` passes: interference from other work only ever adds time."""
    providers = check_providers(
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if provider == "cuda"
        else ["CPUExecutionProvider"]
    )
    options = session_options(threads=threads, optimization="all")
    # Call overhead: a graph that does (almost) nothing.
    trivial = unary("Identity", [1], "overhead")
    call_s = time_probe(trivial, options, providers, budget_s)
    ops = chain(64)
    op_s = max((time_probe(ops, options, providers, budget_s) - call_s) / ops.ops, 0.0)

    measured: list[Probe] = []
    candidates = probes()
    for round_index in range(rounds):
        for probe in candidates:
            if progress:
                progress(probe.name)
            try:
                seconds = time_probe(probe, options, providers, budget_s)
            except Exception:
                probe.seconds = math.nan  # an op this build of ONNX Runtime lacks (a contrib op)
                continue
            probe.seconds = seconds if round_index == 0 else min(probe.seconds, seconds)
    for probe in candidates:
        if math.isnan(probe.seconds) or probe.seconds <= 0:
            continue
        analyse(probe)
        if probe.flops > 0 or probe.moved_bytes > 0:
            measured.append(probe)

    def busy(p: Probe) -> float:
        return max(p.seconds - call_s - op_s * p.ops, 1e-9)

    peak: dict[str, float] = {}
    for dtype in ("fp32", "fp16", "int8", "int4"):
        rates = [p.flops / busy(p) for p in measured if p.op_class == "matmul" and p.dtype == dtype]
        if rates:
            peak[dtype] = max(rates)
    cache = cache_bytes()
    streams = [p for p in measured if p.op_class == "elementwise"]
    # Memory bandwidth from element-wise probes far larger than the cache, cache
    # bandwidth from those that fit in it.
    big = [p for p in streams if p.moved_bytes > 2 * cache] or streams
    bandwidth = max(p.moved_bytes / busy(p) for p in big)
    small = [p for p in streams if p.moved_bytes <= cache] if cache else []
    cache_bandwidth = max((p.moved_bytes / busy(p) for p in small), default=0.0)
    if cache_bandwidth <= bandwidth:
        cache = cache_bandwidth = 0.0

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
        cache_bytes=cache,
        cache_bandwidth=cache_bandwidth,
    )
    # Launch cost per op class, measured on tiny ops of the class (a GEMM or a conv also
    # pays for its thread-pool dispatch and layout work); other classes pay the chain's.
    class_overhead: dict[str, float] = {}
    for op_class, tiny in (("matmul", matmul(4, 16, 16)), ("conv", conv(8, 8, 8, 3))):
        class_overhead[op_class] = (
            max(time_probe(tiny, options, providers, budget_s) - call_s, op_s) * 1000
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
                    weights_cached=p.weight_bytes <= cache,
                ).total_ms
                / 1000
                for p in group
            )
            busy_s = sum(max(p.seconds - call_s - overhead_s * p.ops, 1e-9) for p in group)
            table[op_class] = min(max(roofline_s / busy_s, 0.005), 1.0)
        efficiency[dtype] = table
    # Under a CPU quota (a container's CPU limit) a short probe runs at full speed until
    # the quota's period runs out; sustained work gets only the quota's share. Rates and
    # overheads are scaled to it (efficiencies are ratios, measured at one speed).
    share = sustained_share(threads) if provider == "cpu" else 1.0
    # The probes keep their best round (a burst); a pipeline stage runs for minutes. The
    # largest fp32 GEMM, run back to back, tells how much of the burst speed lasts.
    gemms = [p for p in measured if p.op_class == "matmul" and p.dtype == "fp32"]
    lasting = (
        sustained_ratio(max(gemms, key=lambda p: p.flops), options, providers, sustain_s)
        if gemms and sustain_s > 0
        else 1.0
    )
    share *= lasting
    serialize_ms, serialize_rate = serialize_cost(budget_s)
    hostname = socket.gethostname()
    return DeviceProfile(
        name=name or hostname,
        host=host or hostname,
        kind="gpu" if provider == "cuda" else "cpu",
        memory_bytes=memory_bytes(),
        peak_flops={d: rate * share for d, rate in peak.items()},
        memory_bandwidth=bandwidth * share,
        cache_bytes=cache,
        cache_bandwidth=cache_bandwidth * share,
        efficiency=efficiency,
        class_overhead_ms={k: v / share for k, v in class_overhead.items()},
        op_overhead_ms=op_s * 1000 / share,
        call_overhead_ms=call_s * 1000 / share,
        providers=providers,
        threads=threads,
        probes=measured,
        cpu_share=share,
        serialize_overhead_ms=serialize_ms / share,
        serialize_bandwidth=serialize_rate * share,
        sustained=lasting,
        training_runtime_memory_bytes=training_runtime_bytes(),
    )


def sustained_ratio(probe: Probe, options: Any, providers: list[str], seconds: float) -> float:
    """How much of a probe's best (burst) speed lasts when it runs back to back for
    `seconds`: its best time over the median time of the second half of the run (at
    most 1). Clock boosts that fade, thermal limits and neighbours on a shared host
    show here, not in a best-of-rounds probe."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        probe.model.SerializeToString(), sess_options=options, providers=providers
    )
    samples: list[tuple[float, float]] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(samples) < 10:
        begun = time.perf_counter()
        session.run(None, probe.feeds)
        samples.append((begun - started, time.perf_counter() - begun))
    late = [t for at, t in samples if at >= seconds / 2] or [t for _, t in samples]
    return min(probe.seconds / statistics.median(late), 1.0)


def serialize_cost(budget_s: float) -> tuple[float, float]:
    """(ms per message, bytes/s) of one side of a tensor message between stages: one
    loopback gRPC call carrying a tensor the way stages hand them on (encode, serialise,
    send; receive, parse, decode), halved. Fitted from a small and a large float32 tensor."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import numpy as np

    from lamc.runtime import wire

    def echo(request: bytes, context: Any) -> bytes:
        parsed = wire.SubmitRequest.FromString(request)
        wire.decode(parsed.tensors[0])
        return b""

    server = grpc.server(
        ThreadPoolExecutor(max_workers=1),
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("lamc.profile", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    )
    call = channel.unary_unary(
        "/lamc.profile/Echo", request_serializer=None, response_deserializer=None
    )

    def one_side(count: int) -> float:
        array = np.random.default_rng(0).standard_normal(count).astype(np.float32)
        samples: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(samples) < 7 or (time.perf_counter() < deadline and len(samples) < 200):
            started = time.perf_counter()
            message = wire.SubmitRequest(tensors=[wire.encode("x", array)])
            call(message.SerializeToString(), timeout=30)
            samples.append((time.perf_counter() - started) / 2)
        return statistics.median(samples)

    try:
        small, large = 4096, 2 << 20  # 16 KiB and 8 MiB
        one_side(small)  # connect and warm up
        t_small, t_large = one_side(small), one_side(large)
    finally:
        channel.close()
        server.stop(None)
    rate = (large - small) * 4 / max(t_large - t_small, 1e-9)
    overhead_s = max(t_small - small * 4 / rate, 0.0)
    return overhead_s * 1000, rate


def sustained_share(threads: int) -> float:
    """The fraction of the measured (burst) speed this process sustains under its CPU
    quota: the quota's CPUs over the threads a session uses (1.0 without a quota)."""
    import os

    quota = cpu_quota()
    if quota is None:
        return 1.0
    used = threads or os.cpu_count() or 1
    return min(1.0, quota / used)

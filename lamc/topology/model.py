"""Devices, links, routes and the topology that holds them."""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

from lamc.topology.constraints import Budgets, Constraints

KINDS = ("cpu", "gpu", "npu")
DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
OP_CLASSES = ("matmul", "conv", "elementwise", "norm", "data")
# Backend names a device may list, and the ONNX Runtime execution providers they mean.
BACKENDS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("CPUExecutionProvider",),
    "onnxruntime-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-tensorrt": (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ),
    "onnxruntime-rocm": ("ROCMExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-openvino": ("OpenVINOExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-coreml": ("CoreMLExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-qnn": ("QNNExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-directml": ("DmlExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": (),
}
# Assumed fractions of peak reached per op class until `lamc profile` measures them:
# compute-bound classes use peak FLOP/s, the others memory bandwidth.
DEFAULT_EFFICIENCY = {
    "cpu": {"matmul": 0.6, "conv": 0.5, "elementwise": 0.5, "norm": 0.4, "data": 0.4},
    "gpu": {"matmul": 0.6, "conv": 0.5, "elementwise": 0.7, "norm": 0.5, "data": 0.5},
    "npu": {"matmul": 0.4, "conv": 0.4, "elementwise": 0.4, "norm": 0.3, "data": 0.3},
}
DEFAULT_OVERHEAD_MS = {
    "cpu": (0.004, 0.05),
    "gpu": (0.008, 0.2),
    "npu": (0.02, 0.5),
}  # per op, per call
DEFAULT_RUNTIME_MEMORY = {"cpu": 256 * 2**20, "gpu": 512 * 2**20, "npu": 256 * 2**20}
# A training stage process before its model: Python with torch, transformers and peft
# imported and torch.distributed started. 426 MiB measured on x86-64 Linux (torch 2.13,
# CPU); a CUDA context adds to it on a GPU. `lamc profile` measures it on the device.
DEFAULT_TRAINING_RUNTIME_MEMORY = {"cpu": 448 * 2**20, "gpu": 1024 * 2**20, "npu": 448 * 2**20}


@dataclass(frozen=True)
class Device:
    name: str
    host: str
    kind: str
    memory_bytes: float
    peak_flops: dict[str, float]
    memory_bandwidth: float
    backends: tuple[str, ...]
    efficiency: dict[str, dict[str, float]]
    op_overhead_ms: float
    call_overhead_ms: float
    runtime_memory_bytes: float
    line: int = field(default=0, compare=False)
    # A last-level cache: activations that fit move at cache speed, weights stream from memory.
    cache_bytes: float = 0.0
    cache_bandwidth: float = 0.0
    # Per op class launch overhead where it differs from op_overhead_ms (parallel GEMMs).
    class_overhead_ms: dict[str, float] = field(default_factory=dict)
    # The calibration factor already applied to the rates and overheads above (1: none).
    time_scale: float = 1.0
    # What a stage on this device spends on its own CPU per tensor message to or from
    # another stage (encoding, the gRPC stack, decoding and checks): a fixed cost plus
    # bytes / rate. 0: not modelled (the topology does not say).
    serialize_overhead_ms: float = 0.0
    serialize_bandwidth: float = 0.0
    # What a training stage process takes before its model (0: the kind's default).
    training_runtime_memory_bytes: float = 0.0
    # What a pipeline schedule spends on its own per micro-batch of a training stage
    # (forward and backward, besides the compute): plain training (a data-parallel
    # replica) does not pay it. 0: not modelled.
    training_schedule_overhead_ms: float = 0.0

    @property
    def training_runtime_bytes(self) -> float:
        """The memory a training stage process needs besides its model's state."""
        return self.training_runtime_memory_bytes or float(
            DEFAULT_TRAINING_RUNTIME_MEMORY[self.kind]
        )

    def serialize_ms(self, nbytes: float) -> float:
        """The CPU time of one message of `nbytes` between stages, on this device."""
        per_byte = 1000.0 * nbytes / self.serialize_bandwidth if self.serialize_bandwidth else 0.0
        return self.serialize_overhead_ms + per_byte

    def overhead_ms(self, op_class: str) -> float:
        return self.class_overhead_ms.get(op_class, self.op_overhead_ms)

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`; a dtype with no entry runs at the fp32 rate."""
        return (
            self.peak_flops.get(dtype)
            or self.peak_flops.get("fp32")
            or max(self.peak_flops.values())
        )

    def op_efficiency(self, dtype: str, op_class: str) -> float:
        for key in (dtype, "fp32"):
            table = self.efficiency.get(key)
            if table and op_class in table:
                return table[op_class]
        return DEFAULT_EFFICIENCY[self.kind].get(op_class, 0.5)


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    bandwidth: float  # bytes per second
    latency_ms: float
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Hop:
    a: str
    b: str
    bandwidth: float
    latency_ms: float


@dataclass(frozen=True)
class Route:
    """A path between two devices: transfer time = latency + bytes / bandwidth."""

    hops: tuple[Hop, ...]

    @property
    def latency_ms(self) -> float:
        return sum(h.latency_ms for h in self.hops)

    @property
    def bandwidth(self) -> float:
        return min((h.bandwidth for h in self.hops), default=math.inf)

    def transfer_ms(self, nbytes: float) -> float:
        if not self.hops:
            return 0.0
        return self.latency_ms + 1000.0 * nbytes / self.bandwidth


@dataclass
class Topology:
    name: str
    devices: tuple[Device, ...]
    links: tuple[Link, ...]
    client: str | None = None
    host_link: tuple[float, float] = (16e9, 0.01)  # bandwidth B/s, latency ms
    constraints: Constraints = field(default_factory=Constraints)
    budgets: Budgets = field(default_factory=Budgets)
    path: str = "<topology>"
    sha256: str = ""
    # Where each model input originates (input name -> device or host: the camera's board,
    # the microphone's); inputs not named here come from the client.
    inputs: dict[str, str] = field(default_factory=dict)
    _routes: dict[tuple[str, str], tuple[Route, ...]] = field(default_factory=dict, repr=False)

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def without(self, names: set[str]) -> Topology:
        """The same topology without some devices: their links go too (a device that is
        gone relays nothing) unless the name is also a host still there (the client's, or
        another device's), and routes are derived again."""
        devices = tuple(d for d in self.devices if d.name not in names)
        hosts = {d.host for d in devices} | ({self.client} if self.client else set())
        gone = set(names) - hosts
        return Topology(
            name=self.name,
            devices=devices,
            links=tuple(lk for lk in self.links if lk.a not in gone and lk.b not in gone),
            client=self.client,
            host_link=self.host_link,
            constraints=self.constraints,
            budgets=self.budgets,
            path=self.path,
            sha256=self.sha256,
            inputs={k: v for k, v in self.inputs.items() if v not in gone},
        )

    def routes(self, a: str, b: str) -> tuple[Route, ...]:
        """The Pareto-optimal routes (latency vs bandwidth) from node `a` to node `b`;
        empty when there is no path. `a` and `b` are device or host names."""
        key = (a, b)
        if key not in self._routes:
            # One search from `a` finds the routes to every node: cache them all.
            for target, routes in _pareto_routes(self._graph(), a).items():
                self._routes[(a, target)] = routes
            self._routes.setdefault(key, ())
        return self._routes[key]

    def transfer_ms(self, a: str, b: str, nbytes: float) -> float:
        """Fastest transfer of `nbytes` from `a` to `b` (inf without a path)."""
        if a == b:
            return 0.0
        routes = self.routes(a, b)
        return min((r.transfer_ms(nbytes) for r in routes), default=math.inf)

    def best_route(self, a: str, b: str, nbytes: float) -> Route | None:
        routes = self.routes(a, b)
        return min(routes, key=lambda r: r.transfer_ms(nbytes)) if routes else None

    def _graph(self) -> dict[str, list[Hop]]:
        cached: dict[str, list[Hop]] | None = self.__dict__.get("_graph_cache")
        if cached is not None:
            return cached
        graph: dict[str, list[Hop]] = {}

        def add(a: str, b: str, bandwidth: float, latency: float) -> None:
            graph.setdefault(a, []).append(Hop(a, b, bandwidth, latency))
            graph.setdefault(b, []).append(Hop(b, a, bandwidth, latency))

        bandwidth, latency = self.host_link
        for d in self.devices:
            # A device reaches its host's other devices and network links through the host.
            add(d.name, f"host:{d.host}", bandwidth, latency / 2)
        names = {d.name for d in self.devices}
        for link in self.links:
            a = link.a if link.a in names else f"host:{link.a}"
            b = link.b if link.b in names else f"host:{link.b}"
            add(a, b, link.bandwidth, link.latency_ms)
        self.__dict__["_graph_cache"] = graph
        return graph


def _pareto_routes(graph: dict[str, list[Hop]], a: str) -> dict[str, tuple[Route, ...]]:
    """From `a` to every node: the routes no other route beats on both latency and bandwidth.

    Exact and polynomial: for each bandwidth a link offers, the lowest-latency paths over
    the links at least that wide (one Dijkstra from `a`). A Pareto-optimal route of
    bottleneck w is matched or beaten by the one found for w, so the front is complete;
    O(W * E log V) per source, never an enumeration of paths (exponential when dense)."""
    if a not in graph:
        return {}
    widths = sorted({hop.bandwidth for hops in graph.values() for hop in hops}, reverse=True)
    found: dict[str, list[Route]] = {}
    for width in widths:
        for target, route in _fastest_paths(graph, a, width).items():
            found.setdefault(target, []).append(route)
    result: dict[str, tuple[Route, ...]] = {}
    for target, routes in found.items():
        pareto = [
            r
            for r in routes
            if not any(
                (o.latency_ms <= r.latency_ms and o.bandwidth >= r.bandwidth)
                and (o.latency_ms < r.latency_ms or o.bandwidth > r.bandwidth)
                for o in routes
            )
        ]
        unique: dict[tuple[float, float], Route] = {}
        for route in sorted(pareto, key=lambda r: (r.latency_ms, -r.bandwidth, len(r.hops))):
            unique.setdefault((route.latency_ms, route.bandwidth), route)
        result[target] = tuple(unique.values())
    return result


def _fastest_paths(graph: dict[str, list[Hop]], a: str, min_bandwidth: float) -> dict[str, Route]:
    """Dijkstra from `a` on latency over hops at least `min_bandwidth` wide; ties go to
    fewer hops, then to the path whose node names sort first (deterministic)."""
    heap: list[tuple[float, int, tuple[str, ...], tuple[Hop, ...]]] = [(0.0, 0, (a,), ())]
    best: dict[str, Route] = {}
    while heap:
        latency, count, names, hops = heapq.heappop(heap)
        node = names[-1]
        if node in best:
            continue
        best[node] = Route(hops)
        for hop in graph.get(node, ()):
            if hop.bandwidth >= min_bandwidth and hop.b not in best:
                heapq.heappush(
                    heap, (latency + hop.latency_ms, count + 1, (*names, hop.b), (*hops, hop))
                )
    best.pop(a, None)
    return best


def all_routes_exist(topology: Topology, names: list[str]) -> list[tuple[str, str]]:
    """Pairs of the named devices with no path between them."""
    return [(a, b) for a, b in itertools.combinations(names, 2) if not topology.routes(a, b)]

"""Topologies: the devices a model is compiled for and the links between them (YAML).

```yaml
name: jetson-pi-laptop
client: laptop                 # optional: where requests come from and answers go
devices:
  - name: jetson
    host: jetson.local
    kind: gpu                  # cpu | gpu | npu
    memory: 7GiB               # memory lamc may use on the device
    peak: {fp32: 1.9TFLOPS, fp16: 3.8TFLOPS, int8: 40TOPS}
    memory_bandwidth: 68GB/s
    backends: [onnxruntime-cuda, onnxruntime]
    efficiency: {fp32: {matmul: 0.5}}   # optional, measured fractions of peak
  - include: profiles/laptop.yaml       # a device entry written by `lamc profile`
    name: laptop
links:
  - {a: jetson.local, b: laptop, bandwidth: 600Mbit/s, latency: 3ms}
constraints: {pin: {"lm_head*": laptop}, exclude: [pi]}
budgets: {max_latency_ms: 200, min_memory_headroom: 10%}
```

Link ends are device or host names. Devices on one host reach each other through the
host (PCIe-like `host_link`, overridable under `defaults:`). A transfer over a path of
several hops costs the sum of the hops' latencies plus bytes over the narrowest hop
(streamed, not stored and forwarded). Every validation error names file, line and field.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamc.quantity import (
    QuantityError,
    parse_bandwidth,
    parse_bytes,
    parse_duration_ms,
    parse_flops,
)
from lamc.yamlfile import LinedDict, LinedList, Source, line_of, load_yaml, parse_yaml

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
class Constraints:
    stages: int | None = None
    split_after: tuple[str, ...] = ()
    pin: dict[str, str] = field(default_factory=dict)
    forbid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    colocate: tuple[tuple[str, ...], ...] = ()

    def merged(self, other: Constraints) -> Constraints:
        """`other` (the command line) on top of these (the topology file)."""
        return Constraints(
            stages=other.stages if other.stages is not None else self.stages,
            split_after=tuple(dict.fromkeys(self.split_after + other.split_after)),
            pin={**self.pin, **other.pin},
            forbid={**self.forbid, **other.forbid},
            exclude=tuple(dict.fromkeys(self.exclude + other.exclude)),
            colocate=self.colocate + other.colocate,
        )


@dataclass
class Budgets:
    max_latency_ms: float | None = None
    min_throughput: float | None = None  # requests per second
    min_memory_headroom: float | None = None  # fraction of each device's memory left free

    def merged(self, other: Budgets) -> Budgets:
        return Budgets(
            max_latency_ms=other.max_latency_ms
            if other.max_latency_ms is not None
            else self.max_latency_ms,
            min_throughput=other.min_throughput
            if other.min_throughput is not None
            else self.min_throughput,
            min_memory_headroom=other.min_memory_headroom
            if other.min_memory_headroom is not None
            else self.min_memory_headroom,
        )


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
    _routes: dict[tuple[str, str], tuple[Route, ...]] = field(default_factory=dict, repr=False)

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def without(self, names: set[str]) -> Topology:
        """The same topology without some devices (links and routes re-derived)."""
        return Topology(
            name=self.name,
            devices=tuple(d for d in self.devices if d.name not in names),
            links=self.links,
            client=self.client,
            host_link=self.host_link,
            constraints=self.constraints,
            budgets=self.budgets,
            path=self.path,
            sha256=self.sha256,
        )

    def routes(self, a: str, b: str) -> tuple[Route, ...]:
        """The Pareto-optimal routes (latency vs bandwidth) from node `a` to node `b`;
        empty when there is no path. `a` and `b` are device or host names."""
        key = (a, b)
        if key not in self._routes:
            self._routes[key] = _pareto_routes(self._graph(), a, b)
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
        return graph


def _pareto_routes(
    graph: dict[str, list[Hop]], a: str, b: str, limit: int = 4096
) -> tuple[Route, ...]:
    """Simple paths from a to b, keeping those no other path beats on both latency and
    bandwidth. Topologies are small (a handful of hosts), so enumeration is cheap."""
    if a not in graph or b not in graph:
        return ()
    found: list[Route] = []
    stack: list[tuple[str, tuple[Hop, ...], frozenset[str]]] = [(a, (), frozenset([a]))]
    while stack and len(found) < limit:
        node, hops, seen = stack.pop()
        if node == b:
            found.append(Route(hops))
            continue
        for hop in sorted(graph.get(node, ()), key=lambda h: h.b):
            if hop.b not in seen:
                stack.append((hop.b, (*hops, hop), seen | {hop.b}))
    pareto = [
        r
        for r in found
        if not any(
            (o.latency_ms <= r.latency_ms and o.bandwidth >= r.bandwidth)
            and (o.latency_ms < r.latency_ms or o.bandwidth > r.bandwidth)
            for o in found
        )
    ]
    unique: dict[tuple[float, float], Route] = {}
    for route in sorted(pareto, key=lambda r: (r.latency_ms, -r.bandwidth, len(r.hops))):
        unique.setdefault((route.latency_ms, route.bandwidth), route)
    return tuple(unique.values())


# ------------------------------------------------------------------------------ loading


def load_topology(path: Path | str) -> Topology:
    """Load and validate a topology file; errors are ConfigError (exit 3)."""
    path = Path(path)
    doc, source = load_yaml(path)
    topology = topology_from_document(doc, source, base=path.parent)
    topology.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return topology


def parse_topology(text: str, name: str = "<topology>") -> Topology:
    """Validate a topology given as text (tests, generated topologies)."""
    source = Source(name)
    topology = topology_from_document(parse_yaml(text, source), source, base=Path.cwd())
    topology.sha256 = hashlib.sha256(text.encode()).hexdigest()
    return topology


_TOP_KEYS = {
    "lamc_topology",
    "name",
    "client",
    "defaults",
    "devices",
    "links",
    "constraints",
    "budgets",
}
_DEVICE_KEYS = {
    "name",
    "host",
    "kind",
    "memory",
    "peak",
    "memory_bandwidth",
    "backends",
    "efficiency",
    "op_overhead",
    "call_overhead",
    "runtime_memory",
    "include",
    "lamc_device",
    "cache",
}


def topology_from_document(doc: Any, source: Source, base: Path) -> Topology:
    if not isinstance(doc, LinedDict):
        raise source.error(
            None, "(document)", "a topology is a mapping with `devices:` and `links:`"
        )
    _unknown_keys(doc, _TOP_KEYS, "", source)
    version = doc.get("lamc_topology", 1)
    if version != 1:
        raise source.error(
            line_of(doc, "lamc_topology"),
            "lamc_topology",
            f"unsupported version {version!r} (this lamc reads 1)",
        )
    name = _string(doc.get("name", Path(source.path).stem), source, doc, "name")

    host_link = (16e9, 0.01)
    defaults = doc.get("defaults")
    if defaults is not None:
        if not isinstance(defaults, LinedDict):
            raise source.error(line_of(doc, "defaults"), "defaults", "must be a mapping")
        _unknown_keys(defaults, {"host_link"}, "defaults", source)
        hl = defaults.get("host_link")
        if hl is not None:
            if not isinstance(hl, LinedDict):
                raise source.error(
                    line_of(defaults, "host_link"), "defaults.host_link", "must be a mapping"
                )
            host_link = (
                _quantity(
                    hl, "bandwidth", "defaults.host_link", source, parse_bandwidth, positive=True
                ),
                _quantity(
                    hl, "latency", "defaults.host_link", source, parse_duration_ms, positive=False
                ),
            )

    raw_devices = doc.get("devices")
    if not isinstance(raw_devices, LinedList) or not raw_devices:
        raise source.error(
            line_of(doc, "devices"), "devices", "must be a non-empty list of devices"
        )
    devices: list[Device] = []
    for i, entry in enumerate(raw_devices):
        where = f"devices[{i}]"
        if not isinstance(entry, LinedDict):
            raise source.error(line_of(raw_devices, i), where, "must be a mapping")
        devices.append(_device(entry, where, source, base))
    seen: dict[str, str] = {}
    for d in devices:
        if d.name in seen:
            raise source.error(d.line, "devices.name", f"duplicate device name {d.name!r}")
        seen[d.name] = d.name
    hosts = {d.host for d in devices}
    names = {d.name for d in devices}
    if names & {f"host:{h}" for h in hosts}:
        raise source.error(None, "devices", "device names may not start with 'host:'")

    links: list[Link] = []
    raw_links = doc.get("links", LinedList(line_of(doc, "links") or 0))
    if not isinstance(raw_links, LinedList):
        raise source.error(line_of(doc, "links"), "links", "must be a list")
    for i, entry in enumerate(raw_links):
        where = f"links[{i}]"
        if not isinstance(entry, LinedDict):
            raise source.error(line_of(raw_links, i), where, "must be a mapping")
        _unknown_keys(entry, {"a", "b", "bandwidth", "latency"}, where, source)
        ends = []
        for key in ("a", "b"):
            end = _string(
                entry.get(key), source, entry, f"{where}.{key}", required=key not in entry
            )
            if end not in names and end not in hosts:
                raise source.error(
                    line_of(entry, key),
                    f"{where}.{key}",
                    f"unknown endpoint {end!r}",
                    hint=f"link ends are device names ({', '.join(sorted(names))}) or hosts ({', '.join(sorted(hosts))})",
                )
            ends.append(end)
        if ends[0] == ends[1]:
            raise source.error(entry.line, where, f"a link from {ends[0]!r} to itself")
        links.append(
            Link(
                ends[0],
                ends[1],
                _quantity(entry, "bandwidth", where, source, parse_bandwidth, positive=True),
                _quantity(entry, "latency", where, source, parse_duration_ms, positive=False),
                line=entry.line,
            )
        )
    pairs = [frozenset((link.a, link.b)) for link in links]
    for i, pair in enumerate(pairs):
        if pair in pairs[:i]:
            raise source.error(
                links[i].line, f"links[{i}]", f"a second link between {' and '.join(sorted(pair))}"
            )

    client = doc.get("client")
    if client is not None:
        client = _string(client, source, doc, "client")
        if client not in names and client not in hosts:
            raise source.error(
                line_of(doc, "client"), "client", f"unknown device or host {client!r}"
            )

    topology = Topology(
        name=name,
        devices=tuple(devices),
        links=tuple(links),
        client=client,
        host_link=host_link,
        path=source.path,
    )
    topology.constraints = _constraints(doc.get("constraints"), doc, source, names)
    topology.budgets = _budgets(doc.get("budgets"), doc, source)
    return topology


def _device(entry: LinedDict, where: str, source: Source, base: Path) -> Device:
    _unknown_keys(entry, _DEVICE_KEYS, where, source)
    merged = entry
    if "include" in entry:
        include = _string(entry["include"], source, entry, f"{where}.include")
        target = (base / include).resolve()
        included, inc_source = load_yaml(target)
        if not isinstance(included, LinedDict):
            raise source.error(
                line_of(entry, "include"),
                f"{where}.include",
                f"{include} does not hold a device mapping",
            )
        _unknown_keys(included, _DEVICE_KEYS, "(included device)", inc_source)
        merged = LinedDict(entry.line)
        for src in (included, entry):
            for key, value in src.items():
                if key == "include":
                    continue
                merged[key] = value
                merged.lines[key] = (
                    src.lines.get(key, src.line)
                    if src is entry
                    else entry.lines.get("include", entry.line)
                )
    name = _string(
        merged.get("name"), source, merged, f"{where}.name", required="name" not in merged
    )
    host = _string(merged.get("host", name), source, merged, f"{where}.host")
    kind = _string(
        merged.get("kind"), source, merged, f"{where}.kind", required="kind" not in merged
    )
    if kind not in KINDS:
        raise source.error(
            line_of(merged, "kind"),
            f"{where}.kind",
            f"must be one of {', '.join(KINDS)}, got {kind!r}",
        )
    memory = _quantity(merged, "memory", where, source, parse_bytes, positive=True)
    bandwidth = _quantity(merged, "memory_bandwidth", where, source, parse_bandwidth, positive=True)

    peak_raw = merged.get("peak")
    if not isinstance(peak_raw, LinedDict) or not peak_raw:
        raise source.error(
            line_of(merged, "peak"),
            f"{where}.peak",
            "must map dtypes to peak rates, e.g. {fp32: 1TFLOPS}",
        )
    peak: dict[str, float] = {}
    for dtype in peak_raw:
        if dtype not in DTYPES:
            raise source.error(
                line_of(peak_raw, dtype),
                f"{where}.peak.{dtype}",
                f"unknown dtype (use {', '.join(DTYPES)})",
            )
        peak[dtype] = _quantity(
            peak_raw, dtype, f"{where}.peak", source, parse_flops, positive=True
        )

    backends_raw = merged.get("backends", ["onnxruntime"])
    if not isinstance(backends_raw, list) or not backends_raw:
        raise source.error(
            line_of(merged, "backends"), f"{where}.backends", "must be a non-empty list"
        )
    backends: list[str] = []
    for i, b in enumerate(backends_raw):
        if not isinstance(b, str) or b not in BACKENDS:
            raise source.error(
                line_of(backends_raw, i)
                if isinstance(backends_raw, LinedList)
                else line_of(merged, "backends"),
                f"{where}.backends[{i}]",
                f"unknown backend {b!r}",
                hint=f"known backends: {', '.join(BACKENDS)}",
            )
        if b in backends:
            raise source.error(
                line_of(merged, "backends"), f"{where}.backends", f"{b!r} listed twice"
            )
        backends.append(b)

    efficiency: dict[str, dict[str, float]] = {}
    eff_raw = merged.get("efficiency")
    if eff_raw is not None:
        if not isinstance(eff_raw, LinedDict):
            raise source.error(
                line_of(merged, "efficiency"),
                f"{where}.efficiency",
                "must map dtypes to {op class: fraction}",
            )
        for dtype, table in eff_raw.items():
            field_name = f"{where}.efficiency.{dtype}"
            if dtype not in DTYPES:
                raise source.error(
                    line_of(eff_raw, dtype), field_name, f"unknown dtype (use {', '.join(DTYPES)})"
                )
            if not isinstance(table, LinedDict):
                raise source.error(
                    line_of(eff_raw, dtype), field_name, "must map op classes to fractions"
                )
            efficiency[dtype] = {}
            for op_class, value in table.items():
                if op_class not in OP_CLASSES:
                    raise source.error(
                        line_of(table, op_class),
                        f"{field_name}.{op_class}",
                        f"unknown op class (use {', '.join(OP_CLASSES)})",
                    )
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not 0 < value <= 1
                    or math.isnan(value)
                ):
                    raise source.error(
                        line_of(table, op_class),
                        f"{field_name}.{op_class}",
                        f"must be a fraction in (0, 1], got {value!r}",
                    )
                efficiency[dtype][op_class] = float(value)

    op_overhead, call_overhead = DEFAULT_OVERHEAD_MS[kind]
    class_overhead: dict[str, float] = {}
    if "op_overhead" in merged:
        raw = merged["op_overhead"]
        if isinstance(raw, LinedDict):
            for op_class in raw:
                if op_class != "default" and op_class not in OP_CLASSES:
                    raise source.error(
                        line_of(raw, op_class),
                        f"{where}.op_overhead.{op_class}",
                        f"unknown op class (use default, {', '.join(OP_CLASSES)})",
                    )
                value = _quantity(
                    raw, op_class, f"{where}.op_overhead", source, parse_duration_ms, positive=False
                )
                if op_class == "default":
                    op_overhead = value
                else:
                    class_overhead[op_class] = value
        else:
            op_overhead = _quantity(
                merged, "op_overhead", where, source, parse_duration_ms, positive=False
            )
    if "call_overhead" in merged:
        call_overhead = _quantity(
            merged, "call_overhead", where, source, parse_duration_ms, positive=False
        )
    runtime_memory = float(DEFAULT_RUNTIME_MEMORY[kind])
    if "runtime_memory" in merged:
        runtime_memory = _quantity(
            merged, "runtime_memory", where, source, parse_bytes, positive=False
        )
    cache_bytes = cache_bandwidth = 0.0
    if "cache" in merged:
        cache = merged["cache"]
        if not isinstance(cache, LinedDict):
            raise source.error(
                line_of(merged, "cache"),
                f"{where}.cache",
                "must be a mapping {size: 32MiB, bandwidth: 100GB/s}",
            )
        _unknown_keys(cache, {"size", "bandwidth"}, f"{where}.cache", source)
        cache_bytes = _quantity(cache, "size", f"{where}.cache", source, parse_bytes, positive=True)
        cache_bandwidth = _quantity(
            cache, "bandwidth", f"{where}.cache", source, parse_bandwidth, positive=True
        )
    if runtime_memory >= memory:
        raise source.error(
            line_of(merged, "memory"),
            f"{where}.memory",
            f"{memory:.0f} bytes leaves nothing after the runtime's own {runtime_memory:.0f}",
        )
    return Device(
        name=name,
        host=host,
        kind=kind,
        memory_bytes=memory,
        peak_flops=peak,
        memory_bandwidth=bandwidth,
        backends=tuple(backends),
        efficiency=efficiency,
        op_overhead_ms=op_overhead,
        call_overhead_ms=call_overhead,
        runtime_memory_bytes=runtime_memory,
        line=entry.line,
        cache_bytes=cache_bytes,
        cache_bandwidth=cache_bandwidth,
        class_overhead_ms=class_overhead,
    )


def _constraints(raw: Any, doc: LinedDict, source: Source, devices: set[str]) -> Constraints:
    if raw is None:
        return Constraints()
    if not isinstance(raw, LinedDict):
        raise source.error(line_of(doc, "constraints"), "constraints", "must be a mapping")
    _unknown_keys(
        raw,
        {"stages", "split_after", "pin", "forbid", "exclude", "colocate"},
        "constraints",
        source,
    )
    result = Constraints()
    if "stages" in raw:
        stages = raw["stages"]
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise source.error(
                line_of(raw, "stages"),
                "constraints.stages",
                f"must be a positive integer, got {stages!r}",
            )
        result.stages = stages
    result.split_after = tuple(_string_list(raw, "split_after", "constraints", source))
    result.exclude = tuple(_string_list(raw, "exclude", "constraints", source))
    for name in result.exclude:
        if name not in devices:
            raise source.error(
                line_of(raw, "exclude"), "constraints.exclude", f"unknown device {name!r}"
            )
    for key in ("pin", "forbid"):
        table = raw.get(key)
        if table is None:
            continue
        if not isinstance(table, LinedDict):
            raise source.error(
                line_of(raw, key), f"constraints.{key}", "must map unit names to device names"
            )
        for unit, target in table.items():
            targets = [target] if isinstance(target, str) else target
            if (
                not isinstance(targets, list)
                or not targets
                or not all(isinstance(t, str) for t in targets)
            ):
                raise source.error(
                    line_of(table, unit),
                    f"constraints.{key}.{unit}",
                    "must name a device (or a list, for forbid)",
                )
            for t in targets:
                if t not in devices:
                    raise source.error(
                        line_of(table, unit), f"constraints.{key}.{unit}", f"unknown device {t!r}"
                    )
            if key == "pin":
                if len(targets) != 1:
                    raise source.error(
                        line_of(table, unit), f"constraints.pin.{unit}", "pins one device"
                    )
                result.pin[unit] = targets[0]
            else:
                result.forbid[unit] = tuple(targets)
    colocate = raw.get("colocate")
    if colocate is not None:
        if not isinstance(colocate, list) or not all(
            isinstance(g, list) and len(g) >= 2 and all(isinstance(u, str) for u in g)
            for g in colocate
        ):
            raise source.error(
                line_of(raw, "colocate"),
                "constraints.colocate",
                "must be a list of unit lists, e.g. [[embed, head]]",
            )
        result.colocate = tuple(tuple(g) for g in colocate)
    return result


def _budgets(raw: Any, doc: LinedDict, source: Source) -> Budgets:
    if raw is None:
        return Budgets()
    if not isinstance(raw, LinedDict):
        raise source.error(line_of(doc, "budgets"), "budgets", "must be a mapping")
    _unknown_keys(
        raw, {"max_latency_ms", "min_throughput", "min_memory_headroom"}, "budgets", source
    )
    budgets = Budgets()
    for key in ("max_latency_ms", "min_throughput"):
        if key in raw:
            value = raw[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value > 0
                or math.isinf(value)
            ):
                raise source.error(
                    line_of(raw, key), f"budgets.{key}", f"must be a positive number, got {value!r}"
                )
            setattr(budgets, key, float(value))
    if "min_memory_headroom" in raw:
        try:
            budgets.min_memory_headroom = parse_fraction(raw["min_memory_headroom"])
        except ValueError as exc:
            raise source.error(
                line_of(raw, "min_memory_headroom"), "budgets.min_memory_headroom", str(exc)
            ) from None
    return budgets


def parse_fraction(value: Any) -> float:
    """`10%`, `0.1` -> 0.1 (a fraction in [0, 1))."""
    if isinstance(value, bool):
        raise ValueError("must be a fraction such as 10% or 0.1")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"must be a fraction such as 10% or 0.1, got {value!r}") from None
    elif isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"must be a fraction such as 10% or 0.1, got {value!r}") from None
    else:
        raise ValueError(f"must be a fraction such as 10% or 0.1, got {value!r}")
    if not 0 <= number < 1 or math.isnan(number):
        raise ValueError(f"must be in [0%, 100%), got {value!r}")
    return number


def _unknown_keys(mapping: LinedDict, allowed: set[str], where: str, source: Source) -> None:
    for key in mapping:
        if key not in allowed:
            raise source.error(
                line_of(mapping, key),
                f"{where}.{key}" if where else key,
                "unknown field",
                hint=f"fields here: {', '.join(sorted(allowed))}",
            )


def _string(
    value: Any, source: Source, container: LinedDict, field_name: str, *, required: bool = False
) -> str:
    key = field_name.rsplit(".", 1)[-1]
    if required or value is None:
        raise source.error(
            line_of(container, key) if key in container else container.line,
            field_name,
            "is required",
        )
    if not isinstance(value, str) or not value.strip():
        raise source.error(
            line_of(container, key), field_name, f"must be a non-empty string, got {value!r}"
        )
    return value.strip()


def _string_list(raw: LinedDict, key: str, where: str, source: Source) -> list[str]:
    value = raw.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise source.error(line_of(raw, key), f"{where}.{key}", "must be a list of names")
    return list(value)


def _quantity(
    container: LinedDict, key: str, where: str, source: Source, parse: Any, *, positive: bool
) -> float:
    field_name = f"{where}.{key}"
    if key not in container:
        raise source.error(container.line, field_name, "is required")
    raw = container[key]
    try:
        value = float(parse(raw))
    except QuantityError as exc:
        raise source.error(line_of(container, key), field_name, str(exc)) from None
    if positive and not value > 0:
        raise source.error(
            line_of(container, key), field_name, f"must be greater than zero, got {raw!r}"
        )
    if value < 0:
        raise source.error(
            line_of(container, key), field_name, f"must not be negative, got {raw!r}"
        )
    return value


def all_routes_exist(topology: Topology, names: list[str]) -> list[tuple[str, str]]:
    """Pairs of the named devices with no path between them."""
    return [(a, b) for a, b in itertools.combinations(names, 2) if not topology.routes(a, b)]

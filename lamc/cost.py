"""The cost model: how long each unit takes on each device, how long each cut takes to
cross each route, and how much memory a stage needs. Every number can be explained.

Per op: `op_overhead + max(flops / peak[dtype], bytes / bandwidth) / efficiency[dtype][class]`,
a roofline with a measured fraction of it reached per op class (`lamc profile` measures
these; the topology may state them). A stage adds one `call_overhead`.

Per transfer: route latency + bytes / narrowest bandwidth on the route (multi-hop). A
stage also pays, on its own CPU, for each message it sends to or receives from another
stage (`serialize`: a fixed cost plus bytes / rate, when the topology states it).

Per stage memory: parameters (tied weights once) + peak live activations + the runtime's
own memory (+ KV cache bytes per token x context x batch, for decoders).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from lamc.codecs import encoded_bytes
from lamc.topology import Device, Topology
from lamc.workload import Unit, Workload

# Shape-only ops (Reshape, Shape, Constant) cost a fraction of a real kernel's overhead.
_FREE_OVERHEAD = 0.25


@dataclass(frozen=True)
class OpTime:
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    efficiency: float

    @property
    def total_ms(self) -> float:
        return self.overhead_ms + max(self.compute_ms, self.memory_ms) / self.efficiency


@dataclass(frozen=True)
class UnitTime:
    """A unit on a device, term by term (for `lamc plan --explain`)."""

    unit: str
    device: str
    flops: float
    moved_bytes: float
    compute_bound_ms: float  # ops whose FLOP term dominates, after efficiency
    memory_bound_ms: float  # ops whose byte term dominates, after efficiency
    overhead_ms: float  # per-op launch overhead
    ops: int

    @property
    def total_ms(self) -> float:
        return self.compute_bound_ms + self.memory_bound_ms + self.overhead_ms


@dataclass(frozen=True)
class StageMemory:
    params: float
    activations: float
    runtime: float
    kv_cache: float
    capacity: float

    @property
    def total(self) -> float:
        return self.params + self.activations + self.runtime + self.kv_cache

    @property
    def headroom(self) -> float:
        """Fraction of the device's memory left free."""
        return 1.0 - self.total / self.capacity


def op_time(
    device: Device,
    op_class: str,
    flops: float,
    moved_bytes: float,
    dtype: str,
    weight_bytes: float = 0.0,
    *,
    weights_cached: bool = False,
) -> OpTime:
    """One op's roofline terms on `device`. Activations come from the cache when they fit
    in it; weights too when the whole stage's weights fit (`weights_cached`), else they
    stream from memory."""
    if op_class == "fused":
        return OpTime(0.0, 0.0, 0.0, 1.0)
    if op_class == "free":
        return OpTime(0.0, 0.0, device.op_overhead_ms * _FREE_OVERHEAD, 1.0)
    activations = max(moved_bytes - weight_bytes, 0.0)
    has_cache = device.cache_bandwidth > 0
    act_bw = (
        device.cache_bandwidth
        if has_cache and activations <= device.cache_bytes
        else device.memory_bandwidth
    )
    weight_bw = device.cache_bandwidth if has_cache and weights_cached else device.memory_bandwidth
    return OpTime(
        compute_ms=1000.0 * flops / device.peak(dtype),
        memory_ms=1000.0 * (weight_bytes / weight_bw + activations / act_bw),
        overhead_ms=device.overhead_ms(op_class),
        efficiency=device.op_efficiency(dtype, op_class),
    )


@dataclass(frozen=True)
class MethodCost:
    """What a compression method (lamc.passes.compress) does to cost: the bytes of a weight
    after it, per fp32 byte, and the dtype its MatMuls run in."""

    name: str
    weight_ratio: float
    dtype: str


FP32 = MethodCost("fp32", 1.0, "fp32")


def unit_time(
    unit: Unit, device: Device, *, weights_cached: bool = False, method: MethodCost = FP32
) -> UnitTime:
    """One unit's time on `device`; with a compression `method`, its weighted ops read the
    compressed weights and run in the method's dtype (the device's measured peak for it,
    or its fp32 rate where it declares none)."""
    compute = memory = overhead = 0.0
    for op in unit.ops:
        weight, dtype = op.weight_bytes, op.dtype
        if method.name != "fp32" and weight > 0:
            weight = op.weight_bytes * method.weight_ratio
            if op.op_class == "matmul":
                dtype = method.dtype
        t = op_time(
            device,
            op.op_class,
            op.flops,
            op.moved_bytes - op.weight_bytes + weight,
            dtype,
            weight,
            weights_cached=weights_cached,
        )
        overhead += t.overhead_ms
        if t.compute_ms >= t.memory_ms:
            compute += t.compute_ms / t.efficiency
        else:
            memory += t.memory_ms / t.efficiency
    return UnitTime(
        unit=unit.name,
        device=device.name,
        flops=unit.flops,
        moved_bytes=sum(op.moved_bytes for op in unit.ops),
        compute_bound_ms=compute,
        memory_bound_ms=memory,
        overhead_ms=overhead,
        ops=len(unit.ops),
    )


class CostModel:
    """Cost tables of one workload on one topology, as numpy arrays for the partitioner.

    `kv_tokens` is context x batch for decoders: the KV cache each stage must hold.
    """

    def __init__(
        self,
        workload: Workload,
        topology: Topology,
        *,
        kv_tokens: int = 0,
        codec: str = "raw",
        method: MethodCost = FP32,
    ) -> None:
        self.workload = workload
        self.topology = topology
        self.devices = list(topology.devices)
        self.kv_tokens = kv_tokens
        n = len(workload.units)
        self.n = n
        # Unit times with weights streamed from memory, and with them held in the cache
        # (a stage whose weights fit in the device's cache keeps them there across requests).
        self.method = method
        self.unit_times = [
            [unit_time(u, d, method=method) for u in workload.units] for d in self.devices
        ]
        self.cached_times = [
            [unit_time(u, d, weights_cached=True, method=method) for u in workload.units]
            for d in self.devices
        ]
        self.unit_ms = np.array(
            [[t.total_ms for t in row] for row in self.unit_times], dtype=np.float64
        ).reshape(len(self.devices), n)
        cached_ms = np.array(
            [[t.total_ms for t in row] for row in self.cached_times], dtype=np.float64
        ).reshape(len(self.devices), n)
        zeros = np.zeros((len(self.devices), 1))
        self._prefix = np.concatenate([zeros, np.cumsum(self.unit_ms, axis=1)], axis=1)
        self._prefix_cached = np.concatenate([zeros, np.cumsum(cached_ms, axis=1)], axis=1)
        resident = workload.resident
        self.cut_bytes = np.array(
            [sum(t.bytes for t in c.tensors if t.name not in resident) for c in workload.cuts],
            dtype=np.float64,
        )
        # Between stages tensors travel under the link codec; to and from the client, raw.
        self.codec = codec
        self.link_bytes = np.array(
            [
                sum(
                    encoded_bytes(t.bytes, t.dtype, codec)
                    for t in c.tensors
                    if t.name not in resident
                )
                for c in workload.cuts
            ],
            dtype=np.float64,
        )
        # A stage's own CPU time for the messages it exchanges with its neighbours: the
        # tensors of cut j it receives (j > 0) and of cut k it sends (k < n).
        self._receive_ms = np.zeros((len(self.devices), n + 1))
        self._send_ms = np.zeros((len(self.devices), n + 1))
        for d, device in enumerate(self.devices):
            if device.serialize_overhead_ms or device.serialize_bandwidth:
                hop = np.array([device.serialize_ms(b) for b in self.link_bytes])
                self._receive_ms[d, 1:] = hop[1:]
                self._send_ms[d, :n] = hop[:n]
        self._params = _segment_params(workload) * method.weight_ratio
        self._activations = _segment_max(
            np.array([u.peak_activation_bytes for u in workload.units], dtype=np.float64)
        )
        kv = np.array([u.kv_bytes_per_token for u in workload.units], dtype=np.float64) * kv_tokens
        self._kv = _segment_sum(kv)

    def with_method(self, method: MethodCost) -> CostModel:
        """The same workload and topology under compression `method` (cached)."""
        if method == self.method:
            return self
        cache: dict[str, CostModel] = self.__dict__.setdefault("_by_method", {})
        if method.name not in cache:
            cache[method.name] = CostModel(
                self.workload,
                self.topology,
                kv_tokens=self.kv_tokens,
                codec=self.codec,
                method=method,
            )
        return cache[method.name]

    # ---------------------------------------------------------------- per stage [j, k)

    def weights_cached(self, d: int, j: int, k: int) -> bool:
        device = self.devices[d]
        return device.cache_bandwidth > 0 and self._params[j, k] <= device.cache_bytes

    def compute_ms(self, d: int, j: int, k: int) -> float:
        prefix = self._prefix_cached if self.weights_cached(d, j, k) else self._prefix
        return float(
            self.devices[d].call_overhead_ms
            + prefix[d, k]
            - prefix[d, j]
            + self._receive_ms[d, j]
            + self._send_ms[d, k]
        )

    def memory(self, d: int, j: int, k: int) -> StageMemory:
        device = self.devices[d]
        return StageMemory(
            params=float(self._params[j, k]),
            activations=float(self._activations[j, k]),
            runtime=device.runtime_memory_bytes,
            kv_cache=float(self._kv[j, k]),
            capacity=device.memory_bytes,
        )

    def transfer_ms(self, a: int, b: int, cut: int) -> float:
        return self.topology.transfer_ms(
            self.devices[a].name, self.devices[b].name, self.link_bytes[cut]
        )

    def client_ms(self, d: int, cut: int, *, inbound: bool) -> float:
        """Client -> first stage (inbound) or last stage -> client; 0 without a client.

        The client is a device or a host; on the stage's own host it is one host-link hop."""
        client = self.topology.client
        device = self.devices[d]
        origins = self.topology.inputs
        if inbound and origins:
            # Each input from where it originates (the client for the rest): the sources
            # send at once, each one its own inputs in turn.
            return max(
                (
                    self._from(origin, device.name, nbytes)
                    for origin, nbytes in self._inputs_by_origin(cut).items()
                ),
                default=0.0,
            )
        if client is None or client == device.name:
            return 0.0
        node = client if client in self.topology.names() else f"host:{client}"
        a, b = (node, device.name) if inbound else (device.name, node)
        return self.topology.transfer_ms(a, b, self.cut_bytes[cut])

    def _from(self, origin: str, device: str, nbytes: float) -> float:
        if origin == device:
            return 0.0
        node = origin if origin in self.topology.names() else f"host:{origin}"
        return self.topology.transfer_ms(node, device, nbytes)

    def inputs_ms(self, d: int, names: Collection[str]) -> float:
        """The model inputs `names` (of cut 0) from where each originates to device `d`,
        the sources sending at once: what a join stage of a branch-parallel plan waits
        for besides the branches."""
        return max(
            (
                self._from(origin, self.devices[d].name, nbytes)
                for origin, nbytes in self._inputs_by_origin(0, names).items()
            ),
            default=0.0,
        )

    def inputs_bytes(self, d: int, names: Collection[str]) -> float:
        """Bytes of the model inputs `names` that cross a link to reach device `d`."""
        name = self.devices[d].name
        return float(sum(b for o, b in self._inputs_by_origin(0, names).items() if o != name))

    def _inputs_by_origin(self, cut: int, names: Collection[str] | None = None) -> dict[str, float]:
        """Bytes of cut `cut` (the inputs; only `names` if given) by where they originate
        (none from nowhere)."""
        origins, client = self.topology.inputs, self.topology.client
        found: dict[str, float] = {}
        for tensor in self.workload.cuts[cut].tensors:
            if names is not None and tensor.name not in names:
                continue
            origin = origins.get(tensor.name, client)
            if origin is not None and tensor.name not in self.workload.resident:
                found[origin] = found.get(origin, 0.0) + tensor.bytes
        return found

    def inbound_bytes(self, d: int) -> float:
        """Bytes of input that cross a link to reach a first stage on device `d`."""
        name = self.devices[d].name
        return float(sum(b for o, b in self._inputs_by_origin(0).items() if o != name))

    # ---------------------------------------------------------------- whole tables

    def compute_table(self) -> np.ndarray:
        """[D, n+1, n+1]: stage compute ms of units [j, k) on device d; inf where j >= k."""
        d_count = len(self.devices)
        table = np.full((d_count, self.n + 1, self.n + 1), math.inf)
        upper = np.triu_indices(self.n + 1, k=1)
        for d in range(d_count):
            device = self.devices[d]
            streamed = self._prefix[d][None, :] - self._prefix[d][:, None]
            cached = self._prefix_cached[d][None, :] - self._prefix_cached[d][:, None]
            fits = (
                (self._params <= device.cache_bytes)
                if device.cache_bandwidth > 0
                else np.zeros_like(streamed, dtype=bool)
            )
            full = np.where(fits, cached, streamed) + device.call_overhead_ms
            full = full + self._receive_ms[d][:, None] + self._send_ms[d][None, :]
            table[d][upper] = full[upper]
        return table

    def memory_table(self) -> np.ndarray:
        """[D, n+1, n+1]: bytes a stage [j, k) needs on device d."""
        base = self._params + self._activations + self._kv
        return np.stack([base + d.runtime_memory_bytes for d in self.devices])

    def transfer_table(self) -> np.ndarray:
        """[D, D, n+1]: ms to move cut j from device a to device b (inf: no route)."""
        d_count = len(self.devices)
        table = np.zeros((d_count, d_count, self.n + 1))
        for a in range(d_count):
            for b in range(d_count):
                if a == b:
                    continue
                routes = self.topology.routes(self.devices[a].name, self.devices[b].name)
                if not routes:
                    table[a, b, :] = math.inf
                    continue
                options = np.stack(
                    [r.latency_ms + 1000.0 * self.link_bytes / r.bandwidth for r in routes]
                )
                table[a, b, :] = options.min(axis=0)
        return table

    def whole_model_ms(self, d: int) -> float:
        """The whole model on one device (memory ignored): the fluid bound's ingredient."""
        return self.compute_ms(d, 0, self.n)


def _segment_sum(values: np.ndarray) -> np.ndarray:
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    return np.maximum(prefix[None, :] - prefix[:, None], 0.0)


def _segment_max(values: np.ndarray) -> np.ndarray:
    """[j, k] = max(values[j:k]) (0 for empty)."""
    n = len(values)
    out = np.zeros((n + 1, n + 1))
    for j in range(n):
        out[j, j + 1 :] = np.maximum.accumulate(values[j:])
    return out


def _segment_params(workload: Workload) -> np.ndarray:
    """[j, k] = parameter bytes of units [j, k), each tied weight counted once."""
    sizes = np.array([u.param_bytes for u in workload.units], dtype=np.float64)
    table = _segment_sum(sizes)
    n = len(workload.units)
    for size, users in workload.shared_params.values():
        marks = np.zeros(n)
        marks[list(users)] = 1
        count = _segment_sum(marks)
        table -= size * np.maximum(count - 1, 0)
    return table

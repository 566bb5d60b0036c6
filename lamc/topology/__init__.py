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

from lamc.topology.constraints import Budgets, Constraints, parse_fraction
from lamc.topology.load import load_topology, parse_topology, topology_from_document
from lamc.topology.model import (
    BACKENDS,
    DTYPES,
    KINDS,
    OP_CLASSES,
    Device,
    Hop,
    Link,
    Route,
    Topology,
    all_routes_exist,
)

__all__ = [
    "BACKENDS",
    "DTYPES",
    "KINDS",
    "OP_CLASSES",
    "Budgets",
    "Constraints",
    "Device",
    "Hop",
    "Link",
    "Route",
    "Topology",
    "all_routes_exist",
    "load_topology",
    "parse_fraction",
    "parse_topology",
    "topology_from_document",
]

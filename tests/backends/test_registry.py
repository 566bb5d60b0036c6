"""Backends behind one protocol and one registry: which backend builds a device's stages,
and what each refuses, as reasons."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from lamc.backends import registry
from lamc.backends.onnxruntime.build import OnnxRuntimeBackend
from lamc.backends.protocol import Reason
from lamc.backends.tensorrt.build import TensorRTBackend
from lamc.errors import UsageError
from lamc.topology import parse_topology

TOPOLOGY = """\
lamc_topology: 1
name: mixed
devices:
  - {name: cpu, host: a, kind: cpu, memory: 8GiB, peak: {fp32: 100GFLOPS}, memory_bandwidth: 10GB/s, backends: [onnxruntime]}
  - {name: orin, host: b, kind: gpu, memory: 8GiB, peak: {fp32: 5TFLOPS}, memory_bandwidth: 100GB/s, backends: [tensorrt, onnxruntime-cuda]}
  - {name: trt, host: c, kind: gpu, memory: 8GiB, peak: {fp32: 5TFLOPS}, memory_bandwidth: 100GB/s, backends: [tensorrt]}
links:
  - {a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}
  - {a: b, b: c, bandwidth: 1Gbit/s, latency: 1ms}
"""


def _node(op: str, domain: str = "") -> ir.Node:
    return ir.Node(domain, op, inputs=[], name=f"n_{op}", version=18 if not domain else 1)


def test_registry_holds_each_backend_once_behind_the_protocol() -> None:
    assert set(registry.BACKENDS) == {"onnxruntime", "tensorrt"}
    for backend in registry.BACKENDS.values():
        for name in ("name", "serves", "is_available", "supports", "accepts", "build"):
            assert hasattr(backend, name)
    assert registry.CHOICES == ("auto", "onnxruntime", "tensorrt")


def test_cli_backend_choices_match_the_registry() -> None:
    from lamc.cli.compile_cmd import compile_command

    option = next(p for p in compile_command.params if p.name == "backend")
    assert tuple(option.type.choices) == registry.CHOICES  # type: ignore[attr-defined]


def test_auto_takes_the_first_listed_backend_that_builds_here() -> None:
    topology = parse_topology(TOPOLOGY)
    assert registry.for_device(topology.device("cpu")).name == "onnxruntime"
    # TensorRT is listed first but cannot build here: ONNX Runtime's CUDA backend can.
    expected = "tensorrt" if TensorRTBackend().is_available() else "onnxruntime"
    assert registry.for_device(topology.device("orin")).name == expected
    # Only TensorRT listed: planning goes on, building will say it is missing.
    assert registry.for_device(topology.device("trt")).name == "tensorrt"


def test_a_requested_backend_the_device_lacks_is_a_usage_error() -> None:
    topology = parse_topology(TOPOLOGY)
    with pytest.raises(UsageError, match="lists no tensorrt backend"):
        registry.for_device(topology.device("cpu"), "tensorrt")
    with pytest.raises(UsageError, match="unknown backend"):
        registry.get("pytorch")


def test_supports_answers_with_reasons() -> None:
    ort, trt = OnnxRuntimeBackend(), TensorRTBackend()
    assert ort.supports(_node("MatMul")) is None
    assert trt.supports(_node("MatMul")) is None
    refused = trt.supports(_node("MatMulInteger"))
    assert isinstance(refused, Reason) and "MatMulInteger" in str(refused)
    assert ort.supports(_node("MatMulNBits", "com.microsoft")) is None
    assert trt.supports(_node("MatMulNBits", "com.microsoft")) is not None
    custom = ort.supports(_node("MyOp", "my.domain"))
    assert custom is not None and "my.domain::MyOp" in custom.message
    assert ort.accepts("int4-weight") is None
    assert trt.accepts("fp32") is None
    refusal = trt.accepts("int8-dynamic")
    assert refusal is not None and "onnxruntime" in refusal.message

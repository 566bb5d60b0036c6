"""`--compress SPEC` resolved against a topology: the methods each device may use."""

from __future__ import annotations

from typing import Any

from lamc.passes.compress.common import CompressionError
from lamc.passes.compress.registry import METHODS


def auto_candidates(kind: str, backends: tuple[str, ...]) -> tuple[str, ...]:
    """What `--compress auto` may choose on a device: the methods its backend runs fast.
    CPUs: int8 and int4 kernels, no fast fp16; GPUs: fp16 and int4 (MatMulNBits), and no
    dynamic int8 (ONNX Runtime runs it on the CPU); TensorRT: fp16. int8-static needs
    calibration data and lowrank changes the function, so auto leaves them to the user."""
    if any(b == "tensorrt" for b in backends):
        return ("fp32", "fp16")
    if kind == "cpu":
        return ("fp32", "int8-dynamic", "int4-weight")
    return ("fp32", "fp16", "int4-weight")


def parse_spec(spec: str, devices: list[tuple[str, str]]) -> dict[str, str]:
    """`--compress SPEC` -> device name -> method.

    `int8-dynamic` (every device), or `gpu=fp16,cpu=int8-dynamic` (by device kind), or
    `jetson=fp16,cpu=int8-dynamic` (a device name wins over its kind). `devices` lists
    (name, kind); devices no entry names stay fp32."""
    spec = spec.strip()
    if not spec:
        raise CompressionError("--compress is empty")
    if spec == "auto":
        raise CompressionError("--compress auto is resolved per device by resolve_methods")
    if "=" not in spec:
        if spec not in METHODS:
            raise CompressionError(
                f"--compress {spec}: unknown method; methods: {', '.join(list(METHODS))}"
            )
        return {name: spec for name, _ in devices}
    by_key: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, method = (p.strip() for p in item.partition("="))
        if not sep or not key or method not in METHODS:
            raise CompressionError(
                f"--compress {item!r}: expected DEVICE_OR_KIND=METHOD with a method of {', '.join(list(METHODS))}"
            )
        by_key[key] = method
    names = {name for name, _ in devices}
    kinds = {kind for _, kind in devices}
    unknown = sorted(set(by_key) - names - kinds)
    if unknown:
        raise CompressionError(
            f"--compress: {', '.join(unknown)} is neither a device nor a device kind of the topology "
            f"(devices: {', '.join(sorted(names))}; kinds: {', '.join(sorted(kinds))})"
        )
    return {name: by_key.get(name, by_key.get(kind, "fp32")) for name, kind in devices}


def resolve_methods(spec: str | None, topology: Any) -> dict[str, tuple[str, ...]] | None:
    """Device name -> the methods the planner may pick from (None: no compression)."""
    if not spec:
        return None
    devices = topology.devices
    if spec.strip() == "auto":
        return {d.name: auto_candidates(d.kind, d.backends) for d in devices}
    chosen = parse_spec(spec, [(d.name, d.kind) for d in devices])
    return {name: (method,) for name, method in chosen.items()}

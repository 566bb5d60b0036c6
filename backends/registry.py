"""The backends, defined once: which build backend serves each device of a plan.

`--backend auto` takes the device's first listed backend that lamc can build here (else
its first listed backend lamc knows, which building then reports missing);
`--backend NAME` requires the device to list a backend NAME serves.
"""

from __future__ import annotations

from lamc.backends.onnxruntime.build import OnnxRuntimeBackend
from lamc.backends.protocol import Backend
from lamc.backends.tensorrt.build import TensorRTBackend
from lamc.errors import RuntimeEnvironmentError, UsageError
from lamc.topology import Device

BACKENDS: dict[str, Backend] = {b.name: b for b in (OnnxRuntimeBackend(), TensorRTBackend())}
CHOICES = ("auto", *BACKENDS)  # what --backend accepts


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UsageError(
            f"unknown backend {name!r}", hint=f"backends: {', '.join(BACKENDS)}"
        ) from None


def for_device(device: Device, requested: str = "auto") -> Backend:
    """The backend that builds `device`'s stages (not yet checked for availability)."""
    if requested != "auto":
        backend = get(requested)
        if not any(backend.serves(b) for b in device.backends):
            raise UsageError(
                f"--backend {requested}: device {device.name} lists no {requested} backend "
                f"({', '.join(device.backends)})"
            )
        return backend
    served = [b for listed in device.backends for b in BACKENDS.values() if b.serves(listed)]
    for backend in served:
        if backend.is_available():
            return backend
    if served:
        return served[0]  # building will say it is missing (exit 10); planning can go on
    raise UsageError(
        f"device {device.name}: lamc builds for none of its backends ({', '.join(device.backends)})",
        hint=f"lamc builds for: {', '.join(BACKENDS)}",
    )


def require_available(backend: Backend, where: str) -> None:
    """Building needs the backend here: a missing one is an environment error (exit 10)."""
    if not backend.is_available():
        raise RuntimeEnvironmentError(
            f"{where} needs {backend.name}, which is not installed here",
            hint="pip install 'lamc[tensorrt]' on a machine with an NVIDIA GPU, or choose --backend onnxruntime"
            if backend.name == "tensorrt"
            else f"install {backend.name}",
        )

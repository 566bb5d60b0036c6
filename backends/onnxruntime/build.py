"""ONNX Runtime on the compile host: write a stage's model and the way to load it.

A stage is one ONNX model (weights of 1 KiB and above in external data, aligned for
memory mapping), already compressed by the driver when the plan says so; its execution
providers come from the device's backend list in the topology (`onnxruntime-cuda` ->
CUDA, then CPU).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from lamc.backends.protocol import Artifact, Reason
from lamc.backends.slice import StageGraph
from lamc.errors import EngineBuildError
from lamc.manifest import ArtifactFile
from lamc.topology import BACKENDS, Device

# Contrib ops lamc's passes emit (compression) that ONNX Runtime's CPU provider implements.
_CONTRIB = {
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "FusedMatMul",
    "Gelu",
    "FastGelu",
    "QuickGelu",
    "SkipLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "QOrderedMatMul",
    "DequantizeLinear",
    "QuantizeLinear",
}


class OnnxRuntimeBackend:
    """The onnxruntime backend (every `onnxruntime*` device backend)."""

    name = "onnxruntime"

    def serves(self, device_backend: str) -> bool:
        return device_backend.startswith("onnxruntime")

    def is_available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def supports(self, node: ir.Node) -> Reason | None:
        """None if ONNX Runtime runs this node, else why not."""
        domain = node.domain or ""
        if domain in ("", "ai.onnx"):
            try:
                onnx.defs.get_schema(
                    node.op_type, max_inclusive_version=node.version or 10**6, domain=""
                )
            except onnx.defs.SchemaError:
                return Reason(node.name or node.op_type, f"{node.op_type} is not an ONNX operator")
            return None
        if domain == "com.microsoft" and node.op_type in _CONTRIB:
            return None
        return Reason(
            node.name or node.op_type,
            f"custom operator {domain}::{node.op_type} has no ONNX Runtime kernel lamc knows of",
        )

    def accepts(self, method: str) -> Reason | None:
        return None  # every compression method emits ops ONNX Runtime runs

    def build(self, stage: StageGraph, device: Device, out_dir: Path, *, check: bool) -> Artifact:
        """Write stage `stage.index` under `out_dir/stage-K/` and prove it loads."""
        folder = f"stage-{stage.index}"
        written = stage.write(out_dir / folder)
        files = tuple(ArtifactFile(f"{folder}/{w.name}", w.sha256, w.size) for w in written)
        if check:
            _check(out_dir / folder / "model.onnx", stage.index)
        return Artifact(
            backend=self.name,
            model=f"{folder}/model.onnx",
            files=files,
            providers=providers_for(device),
            session={"graph_optimization": "all", "threads": 0},
        )


def providers_for(device: Device) -> tuple[str, ...]:
    """The execution providers of the device's first ONNX Runtime backend."""
    for backend in device.backends:
        if backend.startswith("onnxruntime"):
            return BACKENDS[backend]
    raise EngineBuildError(
        f"device {device.name} lists no onnxruntime backend (it has {', '.join(device.backends)})"
    )


def _check(path: Path, index: int) -> None:
    """The ONNX checker (full) and a CPU session: the file is a model ONNX Runtime loads."""
    from lamc.backends.onnxruntime.run import new_session

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise EngineBuildError(
            f"stage {index}: {path.name} fails the ONNX checker: {str(exc).splitlines()[0]}"
        ) from exc
    try:
        new_session(str(path), optimization="basic")
    except Exception as exc:
        raise EngineBuildError(
            f"stage {index}: ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0]}"
        ) from exc

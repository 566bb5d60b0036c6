"""ONNX Runtime on the compile host: write a stage's model and the way to load it.

A stage is one ONNX model (plus external data above 1.8 GB); its execution providers come
from the device's backend list in the topology (`onnxruntime-cuda` -> CUDA, then CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from lamc.backends.reason import Artifact, Reason
from lamc.backends.slice import StageGraph
from lamc.errors import EngineBuildError
from lamc.manifest import ArtifactFile
from lamc.topology import BACKENDS, Device

NAME = "onnxruntime"
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


def is_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def supports(node: ir.Node) -> Reason | None:
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


def providers_for(device: Device) -> tuple[str, ...]:
    """The execution providers of the device's first ONNX Runtime backend."""
    for backend in device.backends:
        if backend.startswith("onnxruntime"):
            return BACKENDS[backend]
    raise EngineBuildError(
        f"device {device.name} lists no onnxruntime backend (it has {', '.join(device.backends)})"
    )


def build(
    stage: StageGraph,
    device: Device,
    out_dir: Path,
    *,
    check: bool = True,
    compression: str = "fp32",
    calibration: list[dict[str, Any]] | None = None,
) -> Artifact:
    """Write stage `stage.index` under `out_dir/stage-K/` (compressed with `compression`)
    and prove it loads."""
    folder = f"stage-{stage.index}"
    if compression == "fp32":
        written = stage.write(out_dir / folder)
        files = tuple(ArtifactFile(f"{folder}/{w.name}", w.sha256, w.size) for w in written)
    else:
        files = _write_compressed(stage, out_dir, folder, compression, calibration)
    if check:
        _check(out_dir / folder / "model.onnx", stage.index)
    return Artifact(
        backend=NAME,
        model=f"{folder}/model.onnx",
        files=files,
        providers=providers_for(device),
        session={"graph_optimization": "all", "threads": 0},
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


def _write_compressed(
    stage: StageGraph,
    out_dir: Path,
    folder: str,
    method: str,
    calibration: list[dict[str, Any]] | None,
) -> tuple[ArtifactFile, ...]:
    """The stage compressed with `method`: weights in `model.onnx.data` beside the graph."""
    import hashlib

    from lamc.passes.compress import CompressionError, compress

    try:
        model = compress(stage.proto(), method, calibration=calibration)
    except CompressionError as exc:
        raise EngineBuildError(f"stage {stage.index}: {exc}") from None
    except Exception as exc:
        raise EngineBuildError(
            f"stage {stage.index}: {method} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    directory = out_dir / folder
    directory.mkdir(parents=True, exist_ok=True)
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save_model(
        model,
        str(directory / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    files = []
    for name in ("model.onnx", "model.onnx.data"):
        path = directory / name
        if path.exists():
            data = path.read_bytes()
            files.append(
                ArtifactFile(f"{folder}/{name}", hashlib.sha256(data).hexdigest(), len(data))
            )
    return tuple(files)

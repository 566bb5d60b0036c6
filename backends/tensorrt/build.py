"""TensorRT on the compile host: build a serialized engine for a stage, now (a GPU and
the `tensorrt` package here) or later on the target with the same ONNX file.

Engines are specific to a GPU model and TensorRT version, so the stage's ONNX model is
always written beside the engine; the manifest records both.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import onnx_ir as ir

from lamc.backends.protocol import Artifact, Reason
from lamc.backends.slice import StageGraph
from lamc.backends.weights import SharedWeights
from lamc.errors import EngineBuildError, RuntimeEnvironmentError
from lamc.manifest import ArtifactFile
from lamc.topology import Device

# Ops the ONNX parser of TensorRT 10 does not take (lamc's compression emits them for
# ONNX Runtime); a stage holding one must use the onnxruntime backend.
_UNSUPPORTED = {
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
}
WORKSPACE_BYTES = 1 << 30


def is_available() -> bool:
    """True with the real `tensorrt` package (the stub package alone is a namespace
    directory without an origin) and a CUDA device to build on."""
    spec = importlib.util.find_spec("tensorrt")
    if spec is None or spec.origin is None:
        return False
    try:
        import tensorrt as trt

        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception:
        return False
    return builder is not None


class TensorRTBackend:
    """Serialized TensorRT engines, built here or on the target (`lamc build-engines`)."""

    name = "tensorrt"

    def serves(self, device_backend: str) -> bool:
        return device_backend == "tensorrt"

    def is_available(self) -> bool:
        return is_available()

    def supports(self, node: ir.Node) -> Reason | None:
        if node.op_type in _UNSUPPORTED or (node.domain or "") not in ("", "ai.onnx"):
            return Reason(
                node.name or node.op_type,
                f"TensorRT's ONNX parser has no {node.domain or 'ai.onnx'}::{node.op_type}",
            )
        return None

    def accepts(self, method: str) -> Reason | None:
        if method == "fp32":
            return None
        return Reason(
            method,
            f"--compress {method} needs the onnxruntime backend (TensorRT chooses its own precisions)",
        )

    def build(
        self,
        stage: StageGraph,
        device: Device,
        out_dir: Path,
        *,
        check: bool,
        folder: str | None = None,
        shared: SharedWeights | None = None,
    ) -> Artifact:
        return _build(stage, device, out_dir, folder=folder)


def _build(
    stage: StageGraph,
    device: Device,
    out_dir: Path,
    *,
    fp16: bool = False,
    folder: str | None = None,
) -> Artifact:
    if not is_available():
        raise RuntimeEnvironmentError(
            "TensorRT is not installed here (or there is no GPU to build on)",
            hint="build the engines on the target: lamc build-engines OUT",
        )
    import tensorrt as trt

    folder = folder or f"stage-{stage.index}"
    written, _ = stage.write(out_dir / folder)  # an engine holds its own weights
    onnx_path = out_dir / folder / "model.onnx"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(
            f"stage {stage.index}: TensorRT cannot parse its ONNX model: {errors}"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = [tensor.shape[axis] for axis in range(len(tensor.shape))]
        # Dynamic dims (-1) may take any size from 1 to 2048; static ones are fixed.
        low = trt.Dims([1 if d < 0 else d for d in shape])
        opt = trt.Dims([1 if d < 0 else d for d in shape])
        high = trt.Dims([2048 if d < 0 else d for d in shape])
        profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"stage {stage.index}: TensorRT failed to build an engine for {device.name}"
        )
    engine = bytes(serialized)
    (out_dir / folder / "model.engine").write_bytes(engine)
    files = [ArtifactFile(f"{folder}/{w.name}", w.sha256, w.size) for w in written]
    files.append(
        ArtifactFile(f"{folder}/model.engine", hashlib.sha256(engine).hexdigest(), len(engine))
    )
    return Artifact(
        backend=TensorRTBackend.name,
        model=f"{folder}/model.engine",
        files=tuple(files),
        providers=(),
        session={"fp16": fp16, "trt_version": trt.__version__},
    )

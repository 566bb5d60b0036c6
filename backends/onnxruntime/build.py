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
from lamc.backends.weights import SharedWeights
from lamc.errors import EngineBuildError
from lamc.manifest import ArtifactFile, WeightRef
from lamc.topology import BACKENDS, Device

# Contrib ops (com.microsoft) with a kernel in ONNX Runtime's CPU provider: those lamc's
# compression passes emit, and the fused ops ONNX Runtime's transformer optimiser, Optimum
# and Olive write (ONNX Runtime's OperatorKernels.md, CPU section). A stage holding another
# contrib op is refused before any engine is built.
_CONTRIB = {
    "Attention",
    "BiasGelu",
    "CDist",
    "DecoderMaskedMultiHeadAttention",
    "DequantizeLinear",
    "DynamicQuantizeLSTM",
    "DynamicQuantizeMatMul",
    "EmbedLayerNormalization",
    "ExpandDims",
    "FastGelu",
    "FusedConv",
    "FusedGemm",
    "FusedMatMul",
    "GatherBlockQuantized",
    "Gelu",
    "GridSample",
    "GroupQueryAttention",
    "MatMulBnb4",
    "MatMulInteger16",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "MultiHeadAttention",
    "NhwcMaxPool",
    "QAttention",
    "QEmbedLayerNormalization",
    "QGemm",
    "QLinearAdd",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearConv",
    "QLinearGlobalAveragePool",
    "QLinearLeakyRelu",
    "QLinearMul",
    "QLinearSigmoid",
    "QLinearSoftmax",
    "QLinearWhere",
    "QOrderedMatMul",
    "QuantizeLinear",
    "QuickGelu",
    "Range",
    "RotaryEmbedding",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SparseAttention",
    "TransposeMatMul",
    "Trilu",
    "Unique",
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
        """Write stage `stage.index` under `out_dir/folder/` and prove it loads."""
        folder = folder or f"stage-{stage.index}"
        written, refs = stage.write(out_dir / folder, shared=shared)
        files = tuple(ArtifactFile(f"{folder}/{w.name}", w.sha256, w.size) for w in written)
        if check:
            _check(out_dir, f"{folder}/model.onnx", stage.index, refs, shared)
        return Artifact(
            backend=self.name,
            model=f"{folder}/model.onnx",
            files=files,
            providers=providers_for(device),
            session={"graph_optimization": "all", "threads": 0},
            weights=tuple(refs),
        )


def providers_for(device: Device) -> tuple[str, ...]:
    """The execution providers of the device's first ONNX Runtime backend."""
    for backend in device.backends:
        if backend.startswith("onnxruntime"):
            return BACKENDS[backend]
    raise EngineBuildError(
        f"device {device.name} lists no onnxruntime backend (it has {', '.join(device.backends)})"
    )


def _check(
    out_dir: Path,
    model: str,
    index: int,
    refs: list[WeightRef],
    shared: SharedWeights | None,
) -> None:
    """The ONNX checker (full, on the graph) and a CPU session with the weights as the
    runtime hands them over: the file is a model ONNX Runtime loads."""
    from lamc.backends.onnxruntime.run import load
    from lamc.runtime.weights import map_weights

    path = out_dir / model
    try:
        if refs:
            # The checker refuses locations outside the model's directory: check the graph
            # with its external weights as typed inputs (the loader maps the shared ones
            # itself; ONNX Runtime reads the stage's own data file below).
            proto = onnx.load(str(path), load_external_data=False)
            external = {
                t.name
                for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL
            }
            kept = [t for t in proto.graph.initializer if t.name not in external]
            for tensor in proto.graph.initializer:
                if tensor.name in external:
                    proto.graph.input.append(
                        onnx.helper.make_tensor_value_info(
                            tensor.name, tensor.data_type, list(tensor.dims)
                        )
                    )
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(kept)
            onnx.checker.check_model(proto, full_check=True)
        else:
            onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise EngineBuildError(
            f"stage {index}: {path.name} fails the ONNX checker: {str(exc).splitlines()[0]}"
        ) from exc
    try:
        if shared is not None:
            shared.flush()
        load(
            str(path),
            ["CPUExecutionProvider"],
            optimization="basic",
            initializers=map_weights(out_dir, refs),
        )
    except Exception as exc:
        raise EngineBuildError(
            f"stage {index}: ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0]}"
        ) from exc

"""Compression as a pass on one stage's IR: the compile driver runs it between slicing
and building, so every backend receives a stage model that is already compressed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lamc.errors import EngineBuildError
from lamc.passes.base import PassResult, RewritePass
from lamc.passes.compress.common import CompressionError, Options
from lamc.passes.compress.registry import compress, method


class CompressStage(RewritePass):
    """Compress a stage's model with one method of the registry. The ONNX Runtime
    quantisers this relies on work on ModelProto: the stage goes through one
    serialisation each way."""

    def __init__(
        self,
        name: str,
        calibration: list[dict[str, np.ndarray]] | None = None,
        options: Options | None = None,
    ) -> None:
        super().__init__()
        self.method = method(name)  # an unknown name fails here, before any work
        self.calibration = calibration
        self.options = options

    @property
    def name(self) -> str:
        return f"CompressStage[{self.method.name}]"

    def call(self, model: ir.Model) -> PassResult:
        """A method that cannot apply, or whose tool fails, is an engine build failure
        (exit 8), named with the method."""
        proto = ir.serde.serialize_model(model)
        try:
            out = compress(proto, self.method.name, self.options, self.calibration)
        except CompressionError as exc:
            raise EngineBuildError(str(exc)) from None
        except Exception as exc:
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise EngineBuildError(
                f"{self.method.name} failed: {type(exc).__name__}: {first}"
            ) from exc
        return PassResult(ir.serde.deserialize_model(out), modified=True)

"""What every backend is: one typed protocol for the compile-host face (`build.py`).

A backend builds one stage's model into an artifact for one device. Its `supports(node)`
answers with a reason object, never a bare False: the planner turns the answers into a
mask (a unit a device's backend cannot run is kept off that device, and the plan says
why). The edge face (`run.py`) is a module with `load(...) -> Runner`, read by the
executor through the manifest's backend name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import onnx_ir as ir

from lamc.manifest import ArtifactFile, WeightRef
from lamc.topology import Device

if TYPE_CHECKING:
    from lamc.backends.slice import StageGraph
    from lamc.backends.weights import SharedWeights


@dataclass(frozen=True)
class Reason:
    what: str  # the node or op the reason is about
    message: str

    def __str__(self) -> str:
        return f"{self.what}: {self.message}"


@dataclass(frozen=True)
class Artifact:
    """What a backend built for one stage: files (relative to OUT, hashed as they were
    written) and how to load them."""

    backend: str
    model: str
    files: tuple[ArtifactFile, ...]
    providers: tuple[str, ...]
    session: dict[str, object]
    # Weights the stage loads from the artifact's shared weight files (their files are
    # added to the stage's list, with their final hashes, once every stage is written).
    weights: tuple[WeightRef, ...] = ()


class Backend(Protocol):
    """The compile-host face of a backend."""

    @property
    def name(self) -> str:
        """The manifest's backend name (`onnxruntime`, `tensorrt`)."""
        ...

    def serves(self, device_backend: str) -> bool:
        """Whether this backend builds for a device that lists `device_backend`."""
        ...

    def is_available(self) -> bool:
        """Whether engines can be built on this host now."""
        ...

    def supports(self, node: ir.Node) -> Reason | None:
        """None if the backend runs `node`, else why not."""
        ...

    def accepts(self, method: str) -> Reason | None:
        """None if a stage compressed with `method` can be built, else why not."""
        ...

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
        """Write stage `stage.index` under `out_dir/folder` (default `stage-K`), its weights
        into `shared` where the backend loads them from there, and return what was
        written."""
        ...

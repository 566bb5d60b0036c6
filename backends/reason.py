"""Why a backend cannot take something: a reason object, never a bare False."""

from __future__ import annotations

from dataclasses import dataclass

from lamc.manifest import ArtifactFile


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

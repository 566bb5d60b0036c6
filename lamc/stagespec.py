"""What a manifest says of one stage and of the edges between stages: the tensors, the
files (with sha256 and size), the shared weights a stage loads, its KV caches. Standard
library only (it runs on the edge); `lamc.manifest` holds the whole manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int64, int32, int8, uint8, bool
    shape: tuple[int | str, ...]  # ints, dim names, or expressions of them (past + seq)
    # Integer model inputs (token ids): the values the model takes, [low, high). Checked at
    # the first hop: an id past the vocabulary would index out of the embedding table.
    range: tuple[int, int] | None = None
    # Small integer tensors computed from shapes (a Reshape target crossing a cut): their
    # value as dim expressions, `[batch, seq, 4, 16]`, so a stage warms up with a valid one.
    value: tuple[int | str, ...] | None = None


@dataclass(frozen=True)
class DimRange:
    min: int
    max: int


@dataclass(frozen=True)
class ArtifactFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class EdgeTensor:
    name: str
    codec: str = "raw"  # raw | fp16 | int8


@dataclass(frozen=True)
class Edge:
    source: int  # stage index; -1 is the client
    target: int  # stage index; len(stages) is the client
    tensors: tuple[EdgeTensor, ...]
    bytes: int  # at the operating point


@dataclass(frozen=True)
class KVCache:
    """The KV cache a stage owns: its layers' cache tensors stay on the stage."""

    layers: tuple[int, ...]
    past_inputs: tuple[str, ...]
    present_outputs: tuple[str, ...]
    dtype: str
    bytes_per_token: int  # per sequence, all of this stage's layers
    max_context: int
    past_dim: str = "past"
    # Other stages' past inputs this stage reads only for their length (the exporter's
    # position and mask arithmetic): fed as zeros of that length when caches stay local.
    length_only: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightRef:
    """A weight a stage loads from the artifact's shared `weights/` files: each tensor is
    stored once, whichever plans and stages use it, and memory-mapped at load."""

    name: str  # the initializer's name in the stage model
    file: str  # relative to OUT, one of the stage's files
    offset: int
    length: int
    dtype: str  # numpy name
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StageReplica:
    """A device serving a replicated stage, and the share of the requests it takes."""

    device: str
    host: str
    share: float


@dataclass(frozen=True)
class StageSpec:
    index: int
    device: str
    host: str
    kind: str
    backend: str  # onnxruntime | tensorrt
    providers: tuple[str, ...]
    session: dict[str, Any]
    precision: str
    units: tuple[str, ...]
    model: str  # relative path of the file the backend loads
    files: tuple[ArtifactFile, ...]
    inputs: tuple[str, ...]  # what the engine consumes
    outputs: tuple[str, ...]  # what the engine produces
    receives: tuple[str, ...]  # what arrives from the previous stage (or the client)
    sends: tuple[str, ...]  # what leaves for the next stage (or the client)
    predicted: dict[str, float] = field(default_factory=dict)
    kv_cache: KVCache | None = None
    weights: tuple[WeightRef, ...] = ()
    # A branch-parallel pipeline's stages name the stage they send to (the number of stages:
    # the client); what each receives, and from where, is in the manifest's edges. None:
    # a chain, where stage k sends to k + 1.
    to: int | None = None
    # A replicated stage (`--replicate`): every device serving it, its own first, each
    # taking its share of the requests round-robin (empty: the stage's device alone).
    replicas: tuple[StageReplica, ...] = ()

    @property
    def members(self) -> tuple[StageReplica, ...]:
        return self.replicas or (StageReplica(self.device, self.host, 1.0),)


def parse_kv(raw: dict[str, Any] | None) -> KVCache | None:
    if raw is None:
        return None
    return KVCache(
        layers=tuple(raw["layers"]),
        past_inputs=tuple(raw["past_inputs"]),
        present_outputs=tuple(raw["present_outputs"]),
        dtype=raw["dtype"],
        bytes_per_token=int(raw["bytes_per_token"]),
        max_context=int(raw["max_context"]),
        past_dim=raw.get("past_dim", "past"),
        length_only=tuple(raw.get("length_only", ())),
    )


def parse_stage(s: dict[str, Any]) -> StageSpec:
    return StageSpec(
        index=s["index"],
        device=s["device"],
        host=s["host"],
        kind=s["kind"],
        backend=s["backend"],
        providers=tuple(s["providers"]),
        session=dict(s["session"]),
        precision=s["precision"],
        units=tuple(s["units"]),
        model=s["model"],
        files=tuple(ArtifactFile(f["path"], f["sha256"], int(f["size"])) for f in s["files"]),
        inputs=tuple(s["inputs"]),
        outputs=tuple(s["outputs"]),
        receives=tuple(s["receives"]),
        sends=tuple(s["sends"]),
        predicted=dict(s.get("predicted", {})),
        kv_cache=parse_kv(s.get("kv_cache")),
        weights=tuple(
            WeightRef(
                w["name"],
                w["file"],
                int(w["offset"]),
                int(w["length"]),
                w["dtype"],
                tuple(int(d) for d in w["shape"]),
            )
            for w in s.get("weights", ())
        ),
        to=int(s["to"]) if s.get("to") is not None else None,
        replicas=tuple(
            StageReplica(str(r["device"]), str(r["host"]), float(r["share"]))
            for r in s.get("replicas", ())
        ),
    )


def parse_edge(e: dict[str, Any]) -> Edge:
    return Edge(
        e["source"],
        e["target"],
        tuple(EdgeTensor(t["name"], t["codec"]) for t in e["tensors"]),
        int(e["bytes"]),
    )

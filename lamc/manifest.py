"""The pipeline manifest (`manifest.json`, `"lamc_manifest": 2`): what the executor runs.

It records provenance (versions, the sha256 of the model and the topology), every stage
(device, host, backend, providers, precision, artifact files with sha256 and size, the
tensors it consumes, produces, receives and sends), the edges between stages with their
codecs, the tensor specs with symbolic dims and their ranges, and the plan's predicted
costs. It is written deterministically: sorted keys, no timestamps, relative paths.

The executor trusts nothing before `lamc.verify.verify` passes. This module imports only
the standard library: it runs on the edge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lamc.errors import DoesNotFitError, UsageError

# 2: the typed `plan` section (with the placement text), token-id ranges in tensor specs,
# typed session options and stricter file paths, shape-tensor values. Version 1 manifests
# are refused: recompile.
VERSION = 2
FILENAME = "manifest.json"
# Oldest onnxruntime that runs what lamc emits (opset 18 and its contrib ops).
MIN_ONNXRUNTIME = (1, 17)


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


@dataclass(frozen=True)
class PlanSummary:
    """The manifest's `plan` section: the plan the stages were built for, its predicted
    costs, and what the compile measured (link codecs, compression error)."""

    objective: str
    binding: dict[str, int]
    bottleneck_ms: float
    latency_ms: float
    throughput_rps: float
    fluid_bound_ms: float
    limited_by: str
    text: str = ""  # the placement's compact text form (lamc.plan.parse_placement)
    generation: dict[str, Any] | None = None
    codec: str | None = None  # --codec, when not raw
    max_error: float | None = None  # the accuracy budget lossy choices were held to
    measured_error: float | None = None  # with the link codecs chosen
    compression_error: float | None = None  # with the stages' compression
    headroom: float | None = None  # the smallest fraction of a used device's memory left free

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access (what `lamc inspect` and scripts reading the JSON expect)."""
        if key not in self.__dataclass_fields__:
            return default
        value = getattr(self, key)
        return default if value is None else value

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanSummary:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def of(cls, plan: Any) -> PlanSummary:
        """The summary of a `lamc.plan.Plan` (its predicted costs and placement)."""
        return cls(
            objective=plan.objective,
            binding=dict(plan.binding),
            bottleneck_ms=plan.bottleneck_ms,
            latency_ms=plan.latency_ms,
            throughput_rps=plan.throughput_rps,
            fluid_bound_ms=plan.fluid_bound_ms,
            limited_by=plan.bottleneck,
            text=plan.text,
            generation=plan.generation or None,
            headroom=plan.headroom,
        )


@dataclass(frozen=True)
class FailoverPlan:
    """The plan to switch to when `lost` devices leave: made at compile time with the same
    constraints and budgets, or the reason no plan fits without them."""

    lost: tuple[str, ...]
    plan: PlanSummary | None = None
    reason: str = ""
    # The failover pipeline's own stages and edges, built at compile time beside the
    # primary's (its weights shared with them). Empty when the plan is the primary plan
    # (the lost devices were idle) or there is none.
    stages: tuple[StageSpec, ...] = ()
    edges: tuple[Edge, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"lost": list(self.lost)}
        if self.plan is not None:
            data["plan"] = self.plan.to_dict()
        if self.reason:
            data["reason"] = self.reason
        if self.stages:
            data["stages"] = [asdict(stage) for stage in self.stages]
            data["edges"] = [asdict(edge) for edge in self.edges]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailoverPlan:
        plan = data.get("plan")
        return cls(
            tuple(data["lost"]),
            PlanSummary.from_dict(plan) if plan is not None else None,
            data.get("reason", ""),
            tuple(_stage(stage) for stage in data.get("stages", ())),
            tuple(_edge(edge) for edge in data.get("edges", ())),
        )


@dataclass
class Manifest:
    model: dict[str, Any]
    topology: dict[str, Any]
    provenance: dict[str, str]
    dims: dict[str, DimRange]
    tensors: dict[str, TensorSpec]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stages: tuple[StageSpec, ...]
    edges: tuple[Edge, ...]
    plan: PlanSummary
    # For each device (or pair, with --failover 2) the plan without it, best first by the
    # order of the topology's devices; empty when compiled with --failover 0.
    failover: tuple[FailoverPlan, ...] = ()
    requires: dict[str, str] = field(
        default_factory=lambda: {"onnxruntime": f">={MIN_ONNXRUNTIME[0]}.{MIN_ONNXRUNTIME[1]}"}
    )
    lamc_manifest: int = VERSION
    # `lamc bundle`: the device whose files alone this directory holds (every stage it
    # runs, in every plan); the rest of the manifest is the artifact's, unchanged.
    bundle: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from lamc.plan import rounded

        data = asdict(self)
        if self.bundle is None:
            del data["bundle"]
        data["plan"] = self.plan.to_dict()
        if self.failover:
            data["failover"] = [entry.to_dict() for entry in self.failover]
        else:
            del data["failover"]
        data["dims"] = {k: asdict(v) for k, v in sorted(self.dims.items())}
        data["tensors"] = {
            k: {f: x for f, x in asdict(v).items() if not (f in ("range", "value") and x is None)}
            for k, v in sorted(self.tensors.items())
        }
        result: dict[str, Any] = rounded(data)
        return result

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def pipelines(self) -> list[tuple[str, tuple[StageSpec, ...], tuple[Edge, ...]]]:
        """The primary pipeline and every built failover pipeline: (label, stages, edges)."""
        found = [("primary", self.stages, self.edges)]
        for entry in self.failover:
            if entry.stages:
                found.append(
                    (f"failover without {'+'.join(entry.lost)}", entry.stages, entry.edges)
                )
        return found

    def files(self, device: str | None = None) -> dict[str, ArtifactFile]:
        """Every file of the artifact once (shared weight files are listed by every stage
        that uses them, in every plan); with `device`, those of the stages it runs."""
        return {
            f.path: f
            for _, stages, _ in self.pipelines()
            for s in stages
            if device is None or s.device == device
            for f in s.files
        }

    def present(self) -> dict[str, ArtifactFile]:
        """The files this directory holds: all, or a bundle's device's."""
        return self.files(self.bundle)

    def without(self, lost: Sequence[str]) -> Manifest:
        """The pipeline to run when devices `lost` are gone: the failover plan made for
        them at compile time, as a manifest of its own (the primary's when they were idle).
        A set with no plan is an error that says why."""
        wanted = set(lost)
        for entry in self.failover:
            if set(entry.lost) != wanted:
                continue
            if entry.plan is None:
                raise DoesNotFitError(
                    f"no failover plan without {', '.join(sorted(wanted))}: {entry.reason}"
                )
            if not entry.stages:
                return replace(self, failover=())
            return replace(
                self, stages=entry.stages, edges=entry.edges, plan=entry.plan, failover=()
            )
        planned = sorted({"+".join(e.lost) for e in self.failover})
        raise UsageError(
            f"no failover plan was made for losing {', '.join(sorted(wanted))}",
            hint=f"planned for: {', '.join(planned)}" if planned else "compile with --failover 1",
        )

    def total_bytes(self) -> int:
        return sum(f.size for f in self.files().values())

    def spec(self, name: str) -> TensorSpec:
        return self.tensors[name]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        stages = tuple(_stage(s) for s in data["stages"])
        return cls(
            model=dict(data["model"]),
            topology=dict(data["topology"]),
            provenance=dict(data["provenance"]),
            dims={k: DimRange(int(v["min"]), int(v["max"])) for k, v in data["dims"].items()},
            tensors={
                k: TensorSpec(
                    v["name"],
                    v["dtype"],
                    tuple(v["shape"]),
                    tuple(v["range"]) if v.get("range") is not None else None,
                    tuple(v["value"]) if v.get("value") is not None else None,
                )
                for k, v in data["tensors"].items()
            },
            inputs=tuple(data["inputs"]),
            outputs=tuple(data["outputs"]),
            stages=stages,
            edges=tuple(_edge(e) for e in data["edges"]),
            plan=PlanSummary.from_dict(data["plan"]),
            failover=tuple(FailoverPlan.from_dict(f) for f in data.get("failover", ())),
            requires=dict(data.get("requires", {})),
            lamc_manifest=int(data["lamc_manifest"]),
            bundle=data.get("bundle"),
        )


def _kv(raw: dict[str, Any] | None) -> KVCache | None:
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


def _stage(s: dict[str, Any]) -> StageSpec:
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
        kv_cache=_kv(s.get("kv_cache")),
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
    )


def _edge(e: dict[str, Any]) -> Edge:
    return Edge(
        e["source"],
        e["target"],
        tuple(EdgeTensor(t["name"], t["codec"]) for t in e["tensors"]),
        int(e["bytes"]),
    )

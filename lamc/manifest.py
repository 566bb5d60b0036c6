"""The pipeline manifest (`manifest.json`, `"lamc_manifest": 2`): what the executor runs.

It records provenance (versions, the sha256 of the model and the topology), every stage
(device, host, backend, providers, precision, artifact files with sha256 and size, the
tensors it consumes, produces, receives and sends), the edges between stages with their
codecs, the tensor specs with symbolic dims and their ranges, and the plan's predicted
costs. It is written deterministically: sorted keys, no timestamps, relative paths.

The executor trusts nothing before `verify` passes: the JSON Schema shipped in
`lamc/schemas`, the version, and for every artifact a safe relative path (no `..`, no
absolute path, no symlink anywhere on it), its size and its sha256. This module imports
only the standard library and jsonschema: it runs on the edge.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lamc.errors import DoesNotFitError, IntegrityError, RuntimeEnvironmentError, UsageError
from lamc.integrity import check_consistency, check_requires, check_unlisted

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

    def to_dict(self) -> dict[str, Any]:
        from lamc.plan import rounded

        data = asdict(self)
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

    def files(self) -> dict[str, ArtifactFile]:
        """Every file of the artifact once (shared weight files are listed by every stage
        that uses them, in every plan)."""
        return {f.path: f for _, stages, _ in self.pipelines() for s in stages for f in s.files}

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


# ------------------------------------------------------------------------- schema + verify


def schema() -> dict[str, Any]:
    text = resources.files("lamc.schemas").joinpath("manifest.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_path(root: Path, relative: str, what: str) -> Path:
    """`root/relative`, refusing absolute paths, `..`, and symlinks at any level."""
    if (
        not relative
        or relative.startswith(("/", "\\"))
        or os.path.isabs(relative)
        or "\\" in relative
    ):
        raise IntegrityError(f"{what}: path {relative!r} is not a plain relative path")
    parts = Path(relative).parts
    if ".." in parts or "." in parts:
        raise IntegrityError(f"{what}: path {relative!r} leaves or re-enters its directory")
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise IntegrityError(f"{what}: {current.relative_to(root)} is a symlink")
    resolved = current.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise IntegrityError(f"{what}: path {relative!r} points outside {root}")
    return current


def read_manifest(out_dir: Path) -> Manifest:
    """Parse and schema-check `OUT/manifest.json` (no artifact checks)."""
    path = out_dir / FILENAME
    if not out_dir.is_dir():
        raise IntegrityError(f"{out_dir} is not a directory holding a compiled pipeline")
    if path.is_symlink():
        raise IntegrityError(f"{path} is a symlink")
    if not path.is_file():
        raise IntegrityError(
            f"{path} is missing: {out_dir} is not a compiled pipeline (or was not finished)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise IntegrityError(f"{path}: not valid JSON (nested too deep)") from None
    except ValueError as exc:  # an integer of thousands of digits, among others
        raise IntegrityError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict) or data.get("lamc_manifest") != VERSION:
        version = data.get("lamc_manifest") if isinstance(data, dict) else None
        raise IntegrityError(
            f"{path}: lamc_manifest is {version!r}; this executor reads version {VERSION}"
        )
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise IntegrityError(f"{path}: {where}: {first.message}")
    manifest = Manifest.from_dict(data)
    check_consistency(manifest, path)
    return manifest


def verify(out_dir: Path, stage: int | None = None, without: Sequence[str] = ()) -> Manifest:
    """Everything the executor checks before it loads anything. Raises IntegrityError
    (exit 9) naming the file, or RuntimeEnvironmentError (exit 10) for a runtime too old.

    The manifest is always checked whole; with `stage`, only the files that stage loads
    are hashed (a stage server starts without reading every other stage's weights), of
    the failover plan for losing `without` when given (the manifest returned is still the
    whole one)."""
    manifest = read_manifest(out_dir)
    _check_runtime(manifest)
    check_unlisted(out_dir, manifest)
    plan = manifest.without(without) if without else manifest
    if stage is not None and not 0 <= stage < len(plan.stages):
        raise UsageError(f"--stage {stage}: the pipeline has stages 0..{len(plan.stages) - 1}")
    # Every file of every plan, once (shared weight files are listed by each stage using them).
    files = manifest.files() if stage is None else {f.path: f for f in plan.stages[stage].files}
    verify_files(out_dir, files.values())
    return manifest


def verify_files(out_dir: Path, files: Iterable[ArtifactFile]) -> None:
    """Each file is where the manifest says, of its size and hash (exit 9 otherwise)."""
    for item in files:
        file = safe_path(out_dir, item.path, "files")
        if not file.is_file():
            raise IntegrityError(f"{item.path}: missing")
        size = file.stat().st_size
        if size != item.size:
            raise IntegrityError(
                f"{item.path}: size {size} bytes, the manifest says {item.size} (truncated or replaced)"
            )
        digest = sha256_file(file)
        if digest != item.sha256:
            raise IntegrityError(
                f"{item.path}: sha256 {digest[:16]}..., the manifest says {item.sha256[:16]}... (modified)"
            )


def _check_runtime(manifest: Manifest) -> None:
    check_requires(manifest)
    needs_ort = any(s.backend == "onnxruntime" for s in manifest.stages)
    if not needs_ort:
        return
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeEnvironmentError(
            "onnxruntime is not installed", hint="pip install lamc"
        ) from None
    have = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if have < MIN_ONNXRUNTIME:
        raise RuntimeEnvironmentError(
            f"onnxruntime {onnxruntime.__version__} is older than {'.'.join(map(str, MIN_ONNXRUNTIME))}, which this pipeline needs"
        )

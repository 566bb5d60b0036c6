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
from lamc.stagespec import (  # noqa: F401  (the manifest's parts, imported from here too)
    ArtifactFile,
    DimRange,
    Edge,
    EdgeTensor,
    KVCache,
    StageReplica,
    StageSpec,
    TensorSpec,
    WeightRef,
    parse_edge,
    parse_stage,
)

# 2: the typed `plan` section (with the placement text), token-id ranges in tensor specs,
# typed session options and stricter file paths, shape-tensor values. Version 1 manifests
# are refused: recompile.
VERSION = 2
FILENAME = "manifest.json"
# Oldest onnxruntime that runs what lamc emits (opset 18 and its contrib ops).
MIN_ONNXRUNTIME = (1, 17)


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
            tuple(parse_stage(stage) for stage in data.get("stages", ())),
            tuple(parse_edge(edge) for edge in data.get("edges", ())),
        )


@dataclass(frozen=True)
class StageVariant:
    """A faster build of a primary-plan stage (`lamc compile --variants`): the same cut and
    tensors, compressed with `method`. The variants form a ladder the controller climbs
    under load, the bottleneck stage first: `step` is this one's place on it, `error` the
    output error (against the source model) measured with it and every earlier step
    switched on, `speedup` the stage's fp32 time over its own on its device (the cost
    model's), `measured` the same ratio measured on the compile host."""

    stage: int
    method: str
    step: int
    error: float
    speedup: float
    spec: StageSpec
    measured: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageVariant:
        return cls(
            int(data["stage"]),
            data["method"],
            int(data["step"]),
            float(data["error"]),
            float(data["speedup"]),
            parse_stage(data["spec"]),
            float(data.get("measured", 0.0)),
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
    # `--variants`: faster builds of the primary plan's stages, in ladder order.
    variants: tuple[StageVariant, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        from lamc.plan import rounded

        data = asdict(self)
        if self.bundle is None:
            del data["bundle"]
        if not self.variants:
            del data["variants"]
        data["plan"] = self.plan.to_dict()
        if self.failover:
            data["failover"] = [entry.to_dict() for entry in self.failover]
        else:
            del data["failover"]
        stages = [
            *data["stages"],
            *(s for entry in data.get("failover", ()) for s in entry.get("stages", ())),
            *(v["spec"] for v in data.get("variants", ())),
        ]
        for stage in stages:
            if stage.get("to") is None:
                stage.pop("to", None)  # a chain's stages send to the next
            if not stage.get("replicas"):
                stage.pop("replicas", None)
        data["dims"] = {k: asdict(v) for k, v in sorted(self.dims.items())}
        data["tensors"] = {
            k: {f: x for f, x in asdict(v).items() if not (f in ("range", "value") and x is None)}
            for k, v in sorted(self.tensors.items())
        }
        result: dict[str, Any] = rounded(data)
        return result

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def refuse_replicated(self, what: str) -> None:
        """Exit 2 when a stage is replicated: `what` (gRPC stage servers and their clients)
        runs one device a stage; Ray Serve runs replicas."""
        replicated = [s for s in self.stages if s.replicas]
        if replicated:
            stage = replicated[0]
            raise UsageError(
                f"stage {stage.index} is replicated over "
                f"{', '.join(r.device for r in stage.replicas)}; {what} runs one device a stage",
                hint="serve it on Ray Serve (`lamc serve OUT --ray ADDRESS`, `lamc run OUT "
                "--ray ADDRESS`), or compile with --replicate off",
            )

    @property
    def is_dag(self) -> bool:
        """Branch-parallel: stages name where they send, and the edges what they receive
        from where (a stage may have several predecessors)."""
        return any(s.to is not None for s in self.stages)

    def successor(self, index: int) -> int:
        """The stage that stage `index` sends to (the number of stages: the client)."""
        stage = self.stages[index]
        return stage.to if stage.to is not None else index + 1

    def sources(self, index: int) -> list[int]:
        """Where stage `index`'s tensors come from: stages, and -1 for the client."""
        return sorted({e.source for e in self.edges if e.target == index})

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
        stages = [s for _, plan, _ in self.pipelines() for s in plan]
        stages += [v.spec for v in self.variants]
        return {
            f.path: f
            for s in stages
            if device is None or any(m.device == device for m in s.members)
            for f in s.files
        }

    def at_level(self, level: int) -> Manifest:
        """The primary pipeline with the first `level` steps of the variants ladder on."""
        if not 0 <= level <= len(self.variants):
            raise UsageError(f"the variants ladder has levels 0..{len(self.variants)}")
        on = {v.stage: v.spec for v in self.variants if v.step <= level}
        stages = tuple(on.get(s.index, s) for s in self.stages)
        return replace(self, stages=stages, variants=(), failover=())

    def variant(self, stage: int, method: str) -> StageVariant:
        """Stage `stage`'s variant compressed with `method` (a UsageError naming those
        there are, if none)."""
        for entry in self.variants:
            if entry.stage == stage and entry.method == method:
                return entry
        have = [f"{v.stage}:{v.method}" for v in self.variants]
        raise UsageError(
            f"stage {stage} has no {method} variant",
            hint=f"variants: {', '.join(have)}" if have else "compile with --variants",
        )

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
                self,
                stages=entry.stages,
                edges=entry.edges,
                plan=entry.plan,
                failover=(),
                variants=(),  # built for the primary plan's stages only
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
        stages = tuple(parse_stage(s) for s in data["stages"])
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
            edges=tuple(parse_edge(e) for e in data["edges"]),
            plan=PlanSummary.from_dict(data["plan"]),
            failover=tuple(FailoverPlan.from_dict(f) for f in data.get("failover", ())),
            requires=dict(data.get("requires", {})),
            lamc_manifest=int(data["lamc_manifest"]),
            bundle=data.get("bundle"),
            variants=tuple(StageVariant.from_dict(v) for v in data.get("variants", ())),
        )

"""The thin executor: verify the manifest, load each stage's engine, run the pipeline.

Imports numpy, the backends' `run` modules and the manifest; never torch, onnx or
networkx, so an edge device needs only `pip install lamc`.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamc.errors import UsageError
from lamc.manifest import Manifest, StageSpec
from lamc.runtime.early import PROVIDER_ALIASES, parse_providers  # noqa: F401  (imported from here too)
from lamc.runtime.kvcache import StageCaches, Step, local_inputs, local_outputs, unsupported
from lamc.runtime.tensors import TensorMismatch, check_all
from lamc.verify import verify

# Backend name -> module with `load(model_path, providers, ...) -> Runner`.
RUN_MODULES = {
    "onnxruntime": "lamc.backends.onnxruntime.run",
    "tensorrt": "lamc.backends.tensorrt.run",
}


@dataclass
class StageRunner:
    spec: StageSpec
    runner: Any  # the backend's Runner: run(feeds) -> outputs

    def run(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs: dict[str, np.ndarray] = self.runner.run(
            {name: tensors[name] for name in self.spec.inputs}
        )
        return outputs

    def hop(
        self,
        manifest: Manifest,
        arriving: Mapping[str, np.ndarray],
        binding: dict[str, int],
        caches: StageCaches | None = None,
        step: Step | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One stage on its arriving tensors (already checked, their dims in `binding`):
        its checked outputs, and what it hands on. With `step` the stage's KV caches come
        from and go back to `caches`, and no cache tensor is handed on."""
        spec = self.spec
        feeds = (
            caches.feeds(step, arriving, binding)
            if caches is not None and step is not None
            else arriving
        )
        try:
            produced = check_all(
                spec.outputs,
                manifest.tensors,
                self.run(feeds),
                manifest.dims,
                binding,
                f"stage {spec.index} ({spec.device}) output",
            )
        except Exception:
            if caches is not None and step is not None:
                caches.drop(step.id)  # a failed step leaves no stale cache behind
            raise
        sends = spec.sends
        if caches is not None and step is not None:
            caches.keep(step, produced)
            sends = caches.sends
        return produced, {n: produced[n] if n in produced else feeds[n] for n in sends}


def load_stage(
    out_dir: Path,
    spec: StageSpec,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    shared_pool: bool = False,
) -> StageRunner:
    """Load one verified stage with the providers the manifest asks for (or an explicit override)."""
    module_name = RUN_MODULES.get(spec.backend)
    if module_name is None:
        raise UsageError(f"stage {spec.index}: unknown backend {spec.backend!r}")
    module = importlib.import_module(module_name)
    chosen = tuple(providers) if providers is not None else spec.providers
    session = dict(spec.session)
    if threads is not None:
        session["threads"] = threads
    extra = {}
    if spec.weights:
        from lamc.runtime.weights import map_weights

        extra["initializers"] = map_weights(out_dir, spec.weights)
    runner = module.load(
        str(out_dir / spec.model),
        chosen,
        threads=int(session.get("threads", 0)),
        optimization=str(session.get("graph_optimization", "all")),
        shared_pool=shared_pool,
        **extra,
    )
    return StageRunner(spec, runner)


class Pipeline:
    """All stages of a compiled model in one process."""

    def __init__(self, out_dir: Path, manifest: Manifest, stages: list[StageRunner]) -> None:
        self.out_dir = out_dir
        self.manifest = manifest
        self.stages = stages
        # Edge k (into stage k) -> tensor -> codec: the in-process pipeline applies each
        # link's loss, so what `lamc validate` measures is what stage servers compute.
        self.codecs: dict[int, dict[str, str]] = {
            e.target: {t.name: t.codec for t in e.tensors}
            for e in manifest.edges
            if 0 < e.target < len(manifest.stages) and any(t.codec != "raw" for t in e.tensors)
        }
        self.caches = [StageCaches(manifest, s.spec) for s in stages]
        self.local_kv = unsupported(manifest)  # None: caches can stay in their stages
        self.step_inputs, self.step_outputs = local_inputs(manifest), local_outputs(manifest)

    @classmethod
    def open(
        cls,
        out_dir: Path | str,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        without: Sequence[str] = (),
    ) -> Pipeline:
        """Verify `out_dir` (hashes, sizes, paths) before loading any stage. With `without`,
        load the failover plan made for losing those devices."""
        out = Path(out_dir)
        manifest = verify(out)
        if manifest.bundle is not None:
            raise UsageError(
                f"{out} is the bundle of device {manifest.bundle}: it holds that device's "
                "stages only, not the whole pipeline",
                hint="run the compiled OUT, or serve each device's bundle with lamc serve",
            )
        if without:
            manifest = manifest.without(without)
        return cls.load(out, manifest, providers=providers, threads=threads)

    @classmethod
    def load(
        cls,
        out: Path,
        manifest: Manifest,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> Pipeline:
        """Load the stages of a manifest already verified, or just built by this process
        (the compiler measures a pipeline before it writes the manifest)."""
        # Stages in one process take turns: they share one thread pool (a pool each would
        # keep spinning on the cores the running stage needs).
        shared = len(manifest.stages) > 1
        stages = [
            load_stage(out, spec, providers=providers, threads=threads, shared_pool=shared)
            for spec in manifest.stages
        ]
        return cls(out, manifest, stages)

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        trace: dict[int, dict[str, np.ndarray]] | None = None,
        *,
        sequence: Step | None = None,
        timings: dict[int, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request through every stage (a branch-parallel pipeline's in index order,
        one after another); tensors are checked at every hop. With
        `trace`, each stage's outputs are recorded in it by stage index. With `sequence`
        (a decoder step), each stage keeps its own KV caches: `feeds` hold no cache
        tensors and the outputs no presents. With `timings`, the seconds each stage's hop
        took (its engine's run and the checks around it) are recorded by stage index."""
        manifest = self.manifest
        if manifest.is_dag and sequence is not None:
            raise UsageError("a branch-parallel pipeline keeps no KV caches")
        takes, gives = manifest.inputs, manifest.outputs
        if sequence is not None:
            if self.local_kv is not None:
                raise UsageError(f"stage-local KV caches are not possible: {self.local_kv}")
            takes, gives = self.step_inputs, self.step_outputs
        unknown = sorted(set(feeds) - set(takes))
        if unknown:
            raise TensorMismatch(
                f"input: unknown tensor(s) {', '.join(unknown)}; the model takes {', '.join(takes)}"
            )
        binding: dict[str, int] = {}
        env = check_all(takes, manifest.tensors, feeds, manifest.dims, binding, "input")
        try:
            for stage, caches in zip(self.stages, self.caches):
                spec = stage.spec
                arriving = check_all(
                    caches.receives if sequence else spec.receives,
                    manifest.tensors,
                    env,
                    manifest.dims,
                    binding,
                    f"stage {spec.index} ({spec.device}) input",
                )
                started = time.perf_counter()
                produced, sends = stage.hop(manifest, arriving, binding, caches, sequence)
                # A chain hands each stage's sends to the next; in a branch-parallel
                # pipeline (stages in an order where each follows those it receives
                # from) a later stage may read what any earlier one produced.
                env = {**env, **produced} if manifest.is_dag else sends
                if timings is not None:
                    timings[spec.index] = time.perf_counter() - started
                if trace is not None:
                    trace[spec.index] = produced
                codecs = self.codecs.get(spec.index + 1)
                if codecs:
                    from lamc.runtime.wire import roundtrip

                    env = {n: roundtrip(v, codecs.get(n, "raw")) for n, v in env.items()}
        except BaseException:
            if sequence is not None:
                self.release(sequence.id)  # stages before the failure have moved on
            raise
        return {name: env[name] for name in gives}

    def release(self, sequence_id: str) -> None:
        """Drop a sequence's KV caches from every stage (a generation stopped early)."""
        for caches in self.caches:
            caches.drop(sequence_id)

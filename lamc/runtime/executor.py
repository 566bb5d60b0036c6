"""The thin executor: verify the manifest, load each stage's engine, run the pipeline.

Imports numpy, the backends' `run` modules and the manifest; never torch, onnx or
networkx, so an edge device needs only `pip install lamc`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamc.errors import UsageError
from lamc.manifest import Manifest, StageSpec, verify
from lamc.runtime.kvcache import StageCaches, Step, local_outputs, unsupported
from lamc.runtime.tensors import TensorMismatch, check_all

# Backend name -> module with `load(model_path, providers, ...) -> Runner`.
RUN_MODULES = {
    "onnxruntime": "lamc.backends.onnxruntime.run",
    "tensorrt": "lamc.backends.tensorrt.run",
}
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def parse_providers(text: str | None) -> tuple[str, ...] | None:
    """`--providers cpu` or `cuda,cpu` -> execution provider names (None: as the manifest says)."""
    if not text:
        return None
    names = []
    for item in text.split(","):
        key = item.strip()
        if not key:
            continue
        names.append(PROVIDER_ALIASES.get(key.lower(), key))
    return tuple(names)


@dataclass
class StageRunner:
    spec: StageSpec
    runner: Any  # the backend's Runner: run(feeds) -> outputs

    def run(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs: dict[str, np.ndarray] = self.runner.run(
            {name: tensors[name] for name in self.spec.inputs}
        )
        return outputs


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
    runner = module.load(
        str(out_dir / spec.model),
        chosen,
        threads=int(session.get("threads", 0)),
        optimization=str(session.get("graph_optimization", "all")),
        shared_pool=shared_pool,
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

    @classmethod
    def open(
        cls,
        out_dir: Path | str,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> Pipeline:
        """Verify `out_dir` (hashes, sizes, paths) before loading any stage."""
        out = Path(out_dir)
        manifest = verify(out)
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
    ) -> dict[str, np.ndarray]:
        """Run one request through every stage; tensors are checked at every hop. With
        `trace`, each stage's outputs are recorded in it by stage index. With `sequence`
        (a decoder step), each stage keeps its own KV caches: `feeds` hold no cache
        tensors and the outputs no presents."""
        if sequence is not None:
            return self._run_step(feeds, sequence)
        manifest = self.manifest
        unknown = sorted(set(feeds) - set(manifest.inputs))
        if unknown:
            raise TensorMismatch(
                f"input: unknown tensor(s) {', '.join(unknown)}; the model takes {', '.join(manifest.inputs)}"
            )
        binding: dict[str, int] = {}
        env = check_all(manifest.inputs, manifest.tensors, feeds, manifest.dims, binding, "input")
        for stage in self.stages:
            spec = stage.spec
            arriving = check_all(
                spec.receives,
                manifest.tensors,
                env,
                manifest.dims,
                binding,
                f"stage {spec.index} ({spec.device}) input",
            )
            produced = stage.run(arriving)
            produced = check_all(
                spec.outputs,
                manifest.tensors,
                produced,
                manifest.dims,
                binding,
                f"stage {spec.index} ({spec.device}) output",
            )
            if trace is not None:
                trace[spec.index] = produced
            env = {
                name: produced[name] if name in produced else arriving[name] for name in spec.sends
            }
            codecs = self.codecs.get(spec.index + 1)
            if codecs:
                from lamc.runtime.wire import roundtrip

                env = {
                    name: roundtrip(value, codecs.get(name, "raw")) for name, value in env.items()
                }
        return {name: env[name] for name in manifest.outputs}

    def release(self, sequence_id: str) -> None:
        """Drop a sequence's KV caches from every stage (a generation stopped early)."""
        for caches in self.caches:
            caches.drop(sequence_id)

    def _run_step(self, feeds: Mapping[str, np.ndarray], step: Step) -> dict[str, np.ndarray]:
        if self.local_kv is not None:
            raise UsageError(f"stage-local KV caches are not possible: {self.local_kv}")
        manifest = self.manifest
        env = dict(feeds)
        try:
            for stage, caches in zip(self.stages, self.caches):
                spec = stage.spec
                unknown = sorted(set(env) - set(caches.receives))
                if unknown:
                    raise TensorMismatch(
                        f"stage {spec.index} input: unknown tensor(s) {', '.join(unknown)}"
                    )
                arriving = caches.feeds(step, env)
                produced = check_all(
                    spec.outputs,
                    manifest.tensors,
                    stage.run(arriving),
                    manifest.dims,
                    {},
                    f"stage {spec.index} ({spec.device}) output",
                )
                caches.keep(step, produced)
                env = {
                    name: produced[name] if name in produced else arriving[name]
                    for name in caches.sends
                }
                codecs = self.codecs.get(spec.index + 1)
                if codecs:
                    from lamc.runtime.wire import roundtrip

                    env = {n: roundtrip(v, codecs.get(n, "raw")) for n, v in env.items()}
        except BaseException:
            for caches in self.caches:
                caches.drop(step.id)  # a step that failed half-way leaves no stale cache
            raise
        return {name: env[name] for name in local_outputs(manifest)}

"""The first half of a stage server's start: check the manifest and the stage's graph, then
build the stage's session on a thread of its own.

`lamc serve` begins this before it imports gRPC and sets up the server, so the session
(most of a start for a large stage; ONNX Runtime releases the GIL while it builds) is
built while the interpreter imports the serving side. Nothing is served before the
session is built and every weight byte it mapped has matched its hash (`lifecycle.start`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lamc.manifest import ArtifactFile, Manifest, StageSpec
from lamc.runtime import early
from lamc.runtime.early import ServeKey, devices  # noqa: F401  (imported from here too)
from lamc.runtime.executor import StageRunner, load_stage
from lamc.verify import verify, verify_files


class StageLoad:
    """Stage `index` of `out_dir` (of the failover plan for losing `without`), checked, with
    its session being built. `session` answers the runner and the milliseconds it took."""

    def __init__(
        self,
        out_dir: Path,
        index: int,
        *,
        without: Sequence[str] = (),
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.started = time.perf_counter()
        self.out_dir = out_dir
        # The stage's graph is hashed now, before anything parses it; its weights (raw
        # bytes nothing parses) are only sized here and hashed by the server alongside.
        self.weights: list[ArtifactFile] = []
        self.rehashed = 0  # weight files hashed at this start (the rest were recorded)
        self.full_manifest: Manifest = verify(
            out_dir, stage=index, without=without, later=self.weights
        )
        self.manifest = self.full_manifest.without(without) if without else self.full_manifest
        self.spec: StageSpec = self.manifest.stages[index]
        self.verified = time.perf_counter()
        # A session `lamc.runtime.early` began building before lamc was imported, taken
        # only when this check passed and names exactly the graph, weights and options it
        # was built from.
        chosen = tuple(providers) if providers is not None else None
        key: ServeKey = (out_dir, index, tuple(without), chosen, threads)
        self.head = early.take(key, self.spec)
        self.head_start = False
        # Parts of the build hold the GIL; a short switch interval hands it to the build
        # soon while the caller imports (restored once the session is built).
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 0.0005))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"load{index}")
        self.session: Future[tuple[StageRunner, float]] = pool.submit(
            self._build, providers, threads, interval
        )
        pool.shutdown(wait=False)
        hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hash{index}")
        self.hashed: Future[float] = hashing.submit(self._hash)
        hashing.shutdown(wait=False)

    def _build(
        self, providers: Sequence[str] | None, threads: int | None, interval: float
    ) -> tuple[StageRunner, float]:
        started = time.perf_counter()
        try:
            if self.head is not None:
                with contextlib.suppress(Exception):  # built afresh below, reporting its error
                    runner, ms = self.head.result()
                    self.head_start = True
                    return StageRunner(self.spec, runner), ms
            runner = load_stage(self.out_dir, self.spec, providers=providers, threads=threads)
        finally:
            sys.setswitchinterval(interval)
        return runner, (time.perf_counter() - started) * 1000

    def _hash(self) -> float:
        """Milliseconds taken to hash the weight files. The thread yields the CPU to the
        session's build (the longer path to SERVING) where cores are few."""
        from lamc.runtime import stamps

        started = time.perf_counter()
        # Not on Linux, or not allowed: hash at equal priority.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        # Files this device hashed at an earlier start, unchanged since, are not hashed
        # again (`lamc.runtime.stamps`); their sizes are still checked.
        left = stamps.unverified(self.out_dir, self.weights)
        self.rehashed = len(left)
        verify_files(self.out_dir, self.weights, hash=False)
        verify_files(self.out_dir, left)
        stamps.record(self.out_dir, self.weights)
        return (time.perf_counter() - started) * 1000


_early: tuple[ServeKey, StageLoad] | None = None


def begin_early(args: Sequence[str]) -> None:
    """Begin loading the stage that `lamc serve ARGS` names before the command line is
    parsed in full (the command-line library's imports then overlap the session's build).

    A guess and nothing more: any argument it does not understand, and any error, leaves
    nothing begun, and `take` hands the load over only for the very arguments the command
    parsed, so every check and every error message is still the command's own."""
    global _early
    try:
        key = early.serve_key(args)
        if key is None:
            return
        out_dir, index, without, providers, threads = key
        load = StageLoad(out_dir, index, without=without, providers=providers, threads=threads)
        _early = (key, load)
    except Exception:  # the command meets the same error and reports it
        _early = None


def take(
    out_dir: Path,
    index: int,
    *,
    without: tuple[str, ...],
    providers: tuple[str, ...] | None,
    threads: int | None,
) -> StageLoad:
    """The load `begin_early` began for exactly these arguments, or a new one."""
    global _early
    early, _early = _early, None
    if early is not None and early[0] == (out_dir, index, without, providers, threads):
        return early[1]
    return StageLoad(out_dir, index, without=without, providers=providers, threads=threads)

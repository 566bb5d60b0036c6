"""`Reconfigure`: a stage server switches, between two requests, to a stage of another
plan compiled into its artifact (a failover plan, or back to the primary)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from lamc.errors import UsageError
from lamc.runtime import wire
from lamc.runtime.executor import StageRunner, load_stage
from lamc.runtime.kvcache import StageCaches
from lamc.runtime.security import token_matches

if TYPE_CHECKING:
    from lamc.runtime.server import StageService

log = logging.getLogger("lamc.serve")


async def reconfigure(self: StageService, request: Any, context: Any) -> Any:
    """Switch to stage `request.stage` of the failover plan for losing `request.lost`
    (empty: the primary plan), on this server's device. The new stage's session is
    built from the weights this process has mapped (only weights it did not hold are
    read from disk), between two requests; KV caches of the old stage are dropped."""
    if not token_matches(self.token, context.invocation_metadata()):
        self.counts["unauthenticated"] += 1
        return wire.ReconfigureReply(
            ok=False, code="UNAUTHENTICATED", message="missing or wrong token"
        )
    if not self.ready:  # it listens before its own session is built and checked
        return wire.ReconfigureReply(
            ok=False, code="UNAVAILABLE", message=f"stage {self.index} is still starting"
        )
    from lamc.errors import LamcError
    from lamc.runtime.weights import mapped_files
    from lamc.verify import verify_files

    lost = tuple(str(d) for d in request.lost)
    index = int(request.stage)
    next_address = str(request.next_address) or None
    try:
        manifest = self.full_manifest.without(lost) if lost else self.full_manifest
        if not 0 <= index < len(manifest.stages):
            raise UsageError(f"that plan has stages 0..{len(manifest.stages) - 1}, not {index}")
        spec = manifest.stages[index]
        if spec.device != self.device:
            raise UsageError(
                f"stage {index} of that plan runs on {spec.device}; this server is {self.device}"
            )
        last = index == len(manifest.stages) - 1
        if not last and next_address is None:
            raise UsageError(f"stage {index} of that plan needs the next stage's address")
    except LamcError as exc:
        return wire.ReconfigureReply(ok=False, code="INVALID_ARGUMENT", message=exc.message)
    started = time.perf_counter()
    held = {key[0]: int(m.size) for key, m in mapped_files().items()}
    ready = "a standby session" if spec.model in self.standby else "a session built now"

    def build() -> StageRunner:
        # Runs on the compute thread: between two requests, never during one.
        ready = self.standby.pop(spec.model, None)
        if ready is not None:
            return ready
        fresh = [f for f in spec.files if f.path not in self.verified]
        verify_files(self.out_dir, fresh)
        return load_stage(self.out_dir, spec, providers=self.providers, threads=self.threads)

    loop = asyncio.get_running_loop()
    try:
        runner = await loop.run_in_executor(self._compute, build)
    except LamcError as exc:
        return wire.ReconfigureReply(ok=False, code="FAILED_PRECONDITION", message=exc.message)
    except Exception as exc:
        return wire.ReconfigureReply(
            ok=False, code="INTERNAL", message=f"{type(exc).__name__}: {str(exc)[:300]}"
        )
    old_next = self._next
    if self.standby_on:  # keep the stage being left, for a switch back
        self.standby[self.spec.model] = self.runner
    self.manifest, self.spec, self.index, self.last = manifest, spec, index, last
    self.runner = runner
    self.plan += 1
    self.variant, self.builds = "", {}
    self.caches = StageCaches(manifest, spec, capacity=self.max_sequences)
    self.verified |= {f.path for f in spec.files}
    self.lost = lost
    self.ledger.stage = index
    self.next_address = next_address
    self._next = None
    if next_address is not None and not last:
        self._next = self.forwarder(index, next_address)
        self._next.connect()
    if old_next is not None:
        await old_next.close()
    now = {key[0]: int(m.size) for key, m in mapped_files().items()}
    mapped = sum(size for path, size in now.items() if path not in held)
    reused = sum(
        size
        for path, size in now.items()
        if path in held and any(path.endswith(r.file) for r in spec.weights)
    )
    load_ms = (time.perf_counter() - started) * 1000
    self.counts["reconfigured"] += 1
    log.info(
        "stage server of %s now serves stage %d of the plan without %s in %.0f ms, from %s "
        "(weights: %d bytes mapped anew, %d bytes reused)",
        self.device,
        index,
        ", ".join(lost) or "nothing (the primary plan)",
        load_ms,
        ready,
        mapped,
        reused,
    )
    return wire.ReconfigureReply(
        ok=True,
        stage=index,
        load_ms=load_ms,
        mapped_bytes=mapped,
        reused_bytes=reused,
    )


async def switch_variant(self: StageService, request: Any, context: Any) -> Any:
    """Switch this stage to its variant built with `request.method` (`lamc compile
    --variants`; empty: back to the plan's own build). Same tensors in and out, so the
    requests queued here run on whichever build is current when their turn comes; a
    build is loaded once (on the compute thread, between two requests) and kept."""
    if not token_matches(self.token, context.invocation_metadata()):
        self.counts["unauthenticated"] += 1
        return wire.ReconfigureReply(
            ok=False, code="UNAUTHENTICATED", message="missing or wrong token"
        )
    if not self.ready:  # it listens before its own session is built and checked
        return wire.ReconfigureReply(
            ok=False, code="UNAVAILABLE", message=f"stage {self.index} is still starting"
        )
    from lamc.errors import LamcError
    from lamc.verify import verify_files

    method = str(request.method)
    if method == self.variant:
        return wire.ReconfigureReply(ok=True, stage=self.index)
    if method and self.lost:
        return wire.ReconfigureReply(
            ok=False,
            code="FAILED_PRECONDITION",
            message="variants are built for the primary plan's stages; this server runs a "
            "failover plan",
        )
    started = time.perf_counter()
    if method not in self.builds:
        try:
            spec = self.spec if not method else self.manifest.variant(self.index, method).spec
        except LamcError as exc:
            return wire.ReconfigureReply(ok=False, code="INVALID_ARGUMENT", message=exc.message)

        def build() -> StageRunner:
            verify_files(self.out_dir, [f for f in spec.files if f.path not in self.verified])
            return load_stage(self.out_dir, spec, providers=self.providers, threads=self.threads)

        if not self.builds:
            self.builds[self.variant] = self.runner
        try:
            self.builds[method] = await asyncio.get_running_loop().run_in_executor(
                self._compute, build
            )
        except LamcError as exc:
            return wire.ReconfigureReply(ok=False, code="FAILED_PRECONDITION", message=exc.message)
        self.verified |= {f.path for f in spec.files}
    self.runner, self.variant = self.builds[method], method
    self.counts["variant switches"] += 1
    load_ms = (time.perf_counter() - started) * 1000
    log.info(
        "stage %d now runs %s (%.0f ms)", self.index, method or "the plan's own build", load_ms
    )
    return wire.ReconfigureReply(ok=True, stage=self.index, load_ms=load_ms)


async def prepare_standby(self: StageService) -> None:
    """Build, in the background and one at a time, the session of every stage this
    device runs in another plan of the artifact (verified first), so that a reconfigure
    to that plan swaps sessions instead of building one."""
    from concurrent.futures import ThreadPoolExecutor

    from lamc.verify import verify_files

    wanted = [
        spec
        for _, stages, _ in self.full_manifest.pipelines()
        for spec in stages
        if spec.device == self.device and spec.model != self.spec.model
    ]
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="standby")
    loop = asyncio.get_running_loop()

    def build(spec: Any) -> StageRunner:
        verify_files(self.out_dir, [f for f in spec.files if f.path not in self.verified])
        return load_stage(self.out_dir, spec, providers=self.providers, threads=self.threads)

    try:
        for spec in {s.model: s for s in wanted}.values():
            if spec.model in self.standby or self.draining:
                continue
            try:
                self.standby[spec.model] = await loop.run_in_executor(pool, build, spec)
            except Exception as exc:  # the stage is built on demand instead
                log.warning("standby: %s not prepared: %s", spec.model, str(exc)[:300])
                continue
            self.verified |= {f.path for f in spec.files}
    finally:
        pool.shutdown(wait=False)
    log.info(
        "standby: %d stage(s) of other plans ready in %.0f ms",
        len(self.standby),
        (time.perf_counter() - started) * 1000,
    )

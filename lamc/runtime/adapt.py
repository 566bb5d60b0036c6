"""The load half of `RemotePipeline`: climbing the variants ladder under load.

`lamc compile --variants` builds faster variants of the primary plan's stages, as a
ladder (the bottleneck stage first), each step with the output error measured with it and
every earlier step on. With an SLO, the client watches the p95 latency of the requests
answered in the last window (and the age of those still in flight). Over the SLO it
switches the next stage up the ladder to its variant (an authenticated `Variant` RPC);
under half of it for a hold-down period, it switches the last one back. Steps past the
client's error budget are never taken. Every answer says which build of each stage
produced it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import numpy as np

from lamc.errors import UsageError
from lamc.manifest import Manifest, StageVariant
from lamc.runtime import wire
from lamc.runtime.security import auth_metadata

log = logging.getLogger("lamc.client")


class Answer(dict[str, np.ndarray]):
    """A pipeline's outputs, with `variants`: which build answered at each stage
    (`"K:method"`, the plan's own precision when no variant ran)."""

    variants: tuple[str, ...] = ()


class Adapt:
    """Mixed into `RemotePipeline`; the attributes below are the pipeline's."""

    full_manifest: Manifest
    addresses: list[str]
    lost: tuple[str, ...]
    endpoints: Any
    timeout_s: float
    _channels: list[Any]
    _pending: dict[str, Any]
    _closed: bool
    _loop: asyncio.AbstractEventLoop

    def _init_adapt(
        self,
        slo_ms: float | None,
        max_error: float | None,
        window_s: float = 2.0,
        up_hold_s: float = 0.5,
        down_hold_s: float = 3.0,
        observe_servers: bool = False,
    ) -> None:
        self.slo_ms = slo_ms
        # A controller sends no requests: it sums the stages' own p95 residence times.
        self._observe_servers = observe_servers
        budget = max_error if max_error is not None else float("inf")
        ladder = sorted(self.full_manifest.variants, key=lambda v: v.step)
        if slo_ms is not None and not ladder:
            raise UsageError(
                "--slo-ms switches stages to faster variants under load, and this pipeline "
                "has none",
                hint="compile with --variants int8-dynamic,fp16",
            )
        # The steps within the error budget (each step's error includes every earlier one).
        self.ladder: list[StageVariant] = []
        for variant in ladder:
            if variant.error > budget:
                break
            self.ladder.append(variant)
        self.level = 0  # steps switched on
        self.variant_switches: list[dict[str, Any]] = []
        self._window_s, self._up_hold_s, self._down_hold_s = window_s, up_hold_s, down_hold_s
        self._latencies: collections.deque[tuple[float, float]] = collections.deque()
        self._calm_since: float | None = None
        self._last_switch = 0.0
        self._adapting: asyncio.Task[None] | None = None

    def _observe(self, seconds: float) -> None:
        """A request answered after `seconds` (from its first submission)."""
        if self.slo_ms is not None:
            self._latencies.append((time.monotonic(), seconds))

    def p95_ms(self) -> float:
        """The p95 latency over the window: answered requests, and the age of those still
        in flight (a request waiting longer than the SLO has already missed it)."""
        now = time.monotonic()
        while self._latencies and self._latencies[0][0] < now - self._window_s:
            self._latencies.popleft()
        samples = [s for _, s in self._latencies]
        samples += [now - p.submitted for p in self._pending.values() if not p.future.done()]
        if not samples:
            return 0.0
        return float(np.percentile(np.asarray(samples), 95)) * 1000

    async def _adapt(self) -> None:
        """Every 0.25 s: one step up when over the SLO, one down after a calm hold-down."""
        assert self.slo_ms is not None
        while not self._closed:
            await asyncio.sleep(0.25)
            if self.lost:
                # A failover plan's stages run their own builds (a reconfigure resets them).
                self.level, self._calm_since = 0, None
                continue
            p95 = await self.servers_p95_ms() if self._observe_servers else self.p95_ms()
            now = time.monotonic()
            if p95 > self.slo_ms:
                self._calm_since = None
                if self.level < len(self.ladder) and now - self._last_switch >= self._up_hold_s:
                    await self._step(self.level + 1, p95)
            elif p95 < self.slo_ms / 2 and self.level > 0:
                self._calm_since = self._calm_since or now
                if now - self._calm_since >= self._down_hold_s:
                    await self._step(self.level - 1, p95)
                    self._calm_since = now
            else:
                self._calm_since = None

    async def servers_p95_ms(self) -> float:
        """The pipeline's p95 latency as the stage servers see it: the sum over the stages
        of each one's p95 residence time (queued, running, handing on) over its last two
        seconds. A stage that does not answer adds nothing (failover deals with it)."""
        replies = await asyncio.gather(*(self.stage_status(k) for k in range(len(self._channels))))
        return float(sum(r.residence_p95_ms for r in replies if r is not None))

    async def stage_status(self, stage: int) -> Any:
        """Stage `stage`'s own report (load, and its latest hops' times), or None when it
        does not answer."""
        import grpc

        call = self._channels[stage].unary_unary(
            wire.method("Status"),
            request_serializer=wire.StatusRequest.SerializeToString,
            response_deserializer=wire.StatusReply.FromString,
        )
        try:
            return await call(
                wire.StatusRequest(request_id=""),
                timeout=2.0,
                metadata=auth_metadata(self.endpoints.token),
            )
        except grpc.aio.AioRpcError:
            return None

    async def _step(self, level: int, p95_ms: float) -> None:
        """Move to ladder level `level` (one step up or down)."""
        variant = self.ladder[max(level, self.level) - 1]
        method = variant.method if level > self.level else ""
        try:
            await self.set_variant(variant.stage, method)
        except UsageError as exc:
            log.warning("variant switch refused: %s", exc.message)
            self._last_switch = time.monotonic()
            return
        self.level = level
        self._last_switch = time.monotonic()
        record = {
            "at": self._last_switch,
            "level": level,
            "stage": variant.stage,
            "method": method or "its own build",
            "p95_ms": round(p95_ms, 1),
            "in_flight": sum(1 for p in self._pending.values() if not p.future.done()),
            "error": self.ladder[level - 1].error if level else 0.0,
        }
        self.variant_switches.append(record)
        log.info(
            "load: p95 %.1f ms (SLO %.1f ms): stage %d now runs %s (ladder level %d of %d)",
            p95_ms,
            self.slo_ms or 0.0,
            variant.stage,
            record["method"],
            level,
            len(self.ladder),
        )

    def use_variant(self, stage: int, method: str) -> None:
        """From any thread: switch primary stage `stage` to its `method` variant ("": its
        own build), as the controller does (e.g. to start a run from the plan's builds)."""
        asyncio.run_coroutine_threadsafe(self.set_variant(stage, method), self._loop).result(
            timeout=max(self.timeout_s, 30.0) + 5
        )

    async def set_variant(self, stage: int, method: str) -> None:
        """Switch primary stage `stage` to its `method` variant ("" for its own build)."""
        import grpc

        call = self._channels[stage].unary_unary(
            wire.method("Variant"),
            request_serializer=wire.VariantRequest.SerializeToString,
            response_deserializer=wire.ReconfigureReply.FromString,
        )
        try:
            reply = await call(
                wire.VariantRequest(method=method),
                timeout=max(self.timeout_s, 30.0),
                metadata=auth_metadata(self.endpoints.token),
            )
        except grpc.aio.AioRpcError as exc:
            raise UsageError(
                f"stage {stage} at {self.addresses[stage]}: {exc.code().name}: {exc.details()}"
            ) from None
        if not reply.ok:
            raise UsageError(
                f"stage {stage} at {self.addresses[stage]} refused: {reply.code}: {reply.message}"
            )

"""The fault half of `RemotePipeline`: lost requests, and warm re-planning.

A stage whose subscription breaks and stays down past a grace period moves the pipeline
to the failover plan compiled for losing its device: every server of that plan takes an
authenticated `Reconfigure` (building its new stage from the weights it holds), then the
client reconnects to the new plan's stages. A lost device whose server answers SERVING for
a hold-down period brings the pipeline back. Requests caught in the switch are sent again
by `RemotePipeline` (stateless) or replayed by `generate` (through `recover`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from lamc.errors import RuntimeEnvironmentError, UsageError
from lamc.manifest import Manifest
from lamc.runtime import wire
from lamc.runtime.hosts import Endpoints
from lamc.runtime.kvcache import local_inputs, local_outputs, unsupported
from lamc.runtime.security import auth_metadata, open_channel
from lamc.runtime.whereabouts import Whereabouts, lost_inside


class StageFailure(RuntimeEnvironmentError):
    """A request that a stage (named, with its host) could not carry."""


class Failover:
    """Mixed into `RemotePipeline`; the attributes below are the pipeline's."""

    full_manifest: Manifest
    manifest: Manifest
    endpoints: Endpoints
    addresses: list[str]
    by_device: dict[str, str]
    lost: tuple[str, ...]
    switches: list[dict[str, Any]]
    failover: bool
    failover_grace_s: float
    failback_hold_s: float
    timeout_s: float
    counts: Any
    codec_in: dict[str, str]
    step_inputs: tuple[str, ...]
    step_outputs: tuple[str, ...]
    local_kv: str | None
    _switch: asyncio.Task[None] | None
    _return: asyncio.Task[None] | None
    _plan_since: float
    _up: list[bool]
    _closed: bool
    _tasks: list[asyncio.Task[None]]
    _channels: list[Any]
    _pending: dict[str, Any]
    _whereabouts: Whereabouts

    _client_secret: str

    controller: str | None

    async def _connect(self) -> None:
        raise NotImplementedError

    if TYPE_CHECKING:  # `control.Follow`'s, later in RemotePipeline's bases

        async def _follow(self, noticed: float, wait_s: float | None = None) -> None: ...

    def _on_delivery(self, delivery: Any) -> None:
        raise NotImplementedError

    def _fail_all(self, reason: str) -> None:
        raise NotImplementedError

    def recover(self, epoch: int, timeout_s: float | None = None) -> bool:
        """After a failure: wait for a switch to a failover plan (one that has begun, or
        one the grace period is about to start) and say whether the pipeline is on a newer
        plan than it was when `len(self.switches)` was `epoch`."""
        if not (self.failover or self.controller is not None):
            return False
        started = time.monotonic()
        deadline = started + (timeout_s or self.failover_grace_s * 4 + self.timeout_s)
        # A lost stage is noticed on its subscription, maybe after the failure: allow that.
        settle = started + self.failover_grace_s * 2 + 1.0
        while time.monotonic() < deadline and not self._closed:
            switch = self._switch
            idle = switch is None or switch.done()
            if len(self.switches) > epoch and idle:
                return True
            if idle and all(self._up) and time.monotonic() > settle:
                return False  # every stage is up and nothing switched
            time.sleep(0.02)
        return False

    async def _switched(self) -> None:
        """Wait for a switch to a failover plan in progress (new requests go to the plan
        it switches to)."""
        switch = self._switch
        if switch is not None and not switch.done():
            await asyncio.shield(switch)

    # ----------------------------------------------------------------------- failover

    def _watch(self, k: int) -> None:
        if not (self.failover or self.controller is not None) or self._closed:
            return
        if self._switch is None or self._switch.done():
            self._switch = asyncio.get_running_loop().create_task(self._fail_over(k))

    async def _fail_over(self, k: int) -> None:
        """Stage `k` went down: if it stays down past the grace period, move the pipeline
        to the plan without its device."""
        noticed = time.monotonic()
        if self.controller is not None:
            # `lamc control` switches the servers; follow it once it has.
            await self._follow(noticed)
            return
        await asyncio.sleep(self.failover_grace_s)
        if self._closed or self._up[k]:
            return
        device = self.manifest.stages[k].device
        lost = tuple(sorted({*self.lost, device}))
        try:
            await self._switch_to(lost, noticed, down=k)
        except (UsageError, RuntimeEnvironmentError) as exc:
            self._fail_all(f"stage {k} on {device} is down and failover failed: {exc}")
            return
        if self._return is None or self._return.done():
            self._return = asyncio.get_running_loop().create_task(self._watch_return())

    async def _switch_to(
        self,
        lost: tuple[str, ...],
        noticed: float,
        down: int | None = None,
        reconfigure: bool = True,
    ) -> None:
        """Reconfigure the servers of the plan for losing `lost` (the primary plan when
        empty), all at once, then reconnect to that plan's stages. `down`: the old plan's
        stage that was lost; requests it still held are failed as lost (and so sent
        again) before the old plan's view of them goes. `reconfigure=False`: a controller
        (`lamc control`) has switched the servers already; only reconnect."""
        detected = time.monotonic()
        plan = self.full_manifest.without(lost) if lost else self.full_manifest
        missing = [s.device for s in plan.stages if s.device not in self.by_device]
        if missing:
            raise UsageError(
                f"the plan without {', '.join(lost)} needs {', '.join(missing)}, "
                "which runs no stage server this client knows"
            )
        addresses = [self.by_device[s.device] for s in plan.stages]
        # Every server builds its new stage at once (each on its own host); a stage hands
        # on to its next one only once the client has reconnected, after all are done.
        built = await asyncio.gather(
            *(
                self._reconfigure(
                    addresses[j], lost, j, addresses[j + 1] if j + 1 < len(addresses) else ""
                )
                for j in range(len(plan.stages))
                if reconfigure
            )
        )
        replies = dict(enumerate(built))
        if down is not None:
            # A request the lost stage accepted just as it died may have been checked
            # before it got there: look again, with the old plan's stages, now.
            reason = "it was lost with its device"
            await asyncio.gather(
                *(self._check_lost(rid, down, reason) for rid in list(self._pending))
            )
        # Reconnect: the old plan's subscriptions and channels go, the new plan's come.
        for task in self._tasks:
            task.cancel()
        for channel in self._channels:
            await channel.close(None)
        self._tasks.clear()
        self._channels.clear()
        self.manifest = plan
        self.lost = lost
        self.addresses[:] = addresses
        self._up = [False] * len(addresses)
        self.codec_in = {t.name: t.codec for t in plan.edges[0].tensors}
        self.step_inputs, self.step_outputs = local_inputs(plan), local_outputs(plan)
        self.local_kv = unsupported(plan)
        await self._connect()
        switched = self._plan_since = time.monotonic()
        self.counts["failovers" if lost else "failbacks"] += 1
        self.switches.append(
            {
                "lost": lost,
                "stages": len(plan.stages),
                "placement": plan.plan.text,
                "switch_ms": (switched - detected) * 1000,
                "noticed": noticed,  # monotonic: the change was seen
                "switched": switched,  # monotonic: the new plan's stages connected
                "grace_ms": self.failover_grace_s * 1000,
                "load_ms": {j: r.load_ms for j, r in replies.items()},
                "reused_bytes": sum(r.reused_bytes for r in replies.values()),
                "mapped_bytes": sum(r.mapped_bytes for r in replies.values()),
            }
        )

    async def _watch_return(self) -> None:
        """While devices are lost: probe their servers' health; one SERVING for the whole
        hold-down period brings the pipeline back to the plan without only the others."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        healthy_since: dict[str, float] = {}
        while self.lost and not self._closed:
            await asyncio.sleep(min(0.2, self.failback_hold_s / 4))
            for device in self.lost:
                address = self.by_device[device]
                channel = open_channel(address, self.endpoints.tls)
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=wire.SERVICE), timeout=1.0
                    )
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    serving = False
                finally:
                    await channel.close(None)
                if not serving:
                    healthy_since.pop(device, None)
                    continue
                since = healthy_since.setdefault(device, time.monotonic())
                if time.monotonic() - since < self.failback_hold_s:
                    continue
                back = tuple(d for d in self.lost if d != device)
                await self._switched()
                switch = asyncio.get_running_loop().create_task(
                    self._switch_to(back, time.monotonic())
                )
                self._switch = switch
                try:
                    await switch
                except (UsageError, RuntimeEnvironmentError):
                    healthy_since.pop(device, None)  # try again after another hold-down
                break

    async def _reconfigure(
        self, address: str, lost: tuple[str, ...], stage: int, after: str
    ) -> Any:
        import grpc

        channel = open_channel(
            address, self.endpoints.tls, wire.max_message_bytes(self.full_manifest)
        )
        try:
            call = channel.unary_unary(
                wire.method("Reconfigure"),
                request_serializer=wire.ReconfigureRequest.SerializeToString,
                response_deserializer=wire.ReconfigureReply.FromString,
            )
            reply = await call(
                wire.ReconfigureRequest(lost=list(lost), stage=stage, next_address=after),
                timeout=max(self.timeout_s, 60.0),
                metadata=auth_metadata(self.endpoints.token),
            )
        except grpc.aio.AioRpcError as exc:
            raise StageFailure(
                f"reconfiguring {address} as stage {stage}: {exc.code().name}: {exc.details()}"
            ) from None
        finally:
            await channel.close(None)
        if not reply.ok:
            raise StageFailure(
                f"{address} refused to become stage {stage}: {reply.code}: {reply.message}"
            )
        return reply

    # -------------------------------------------------------------------- lost stages

    async def _subscription(self, k: int, connected: asyncio.Event) -> None:
        import grpc

        call = self._channels[k].unary_stream(
            wire.method("Subscribe"),
            request_serializer=wire.SubscribeRequest.SerializeToString,
            response_deserializer=wire.Delivery.FromString,
        )
        backoff = 0.05
        while not self._closed:
            try:
                stream = call(
                    wire.SubscribeRequest(client_secret=self._client_secret),
                    metadata=auth_metadata(self.endpoints.token),
                    wait_for_ready=True,
                )
                await stream.wait_for_connection()
                self._up[k] = True
                connected.set()
                backoff = 0.05
                async for delivery in stream:
                    self._on_delivery(delivery)
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "stream ended",
                    None,
                )
            except asyncio.CancelledError:
                return
            except grpc.aio.AioRpcError as exc:
                if self._closed:
                    return
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    connected.set()
                    self._fail_all(f"stage {k} at {self.addresses[k]} refused the token")
                    return
                if self._up[k]:
                    self._up[k] = False
                    self._on_stage_down(k, f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _expire(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done():
            return
        where = await self._whereabouts.trace(request_id)
        if not pending.future.done():
            failure = StageFailure(
                f"request timed out after {time.monotonic() - pending.submitted:.2f} s: {where}"
            )
            failure.lost = "lost" in where  # type: ignore[attr-defined]
            pending.future.set_exception(failure)

    def _on_stage_down(self, k: int, reason: str) -> None:
        self._watch(k)
        for request_id, pending in list(self._pending.items()):
            if not pending.future.done():
                asyncio.get_running_loop().create_task(self._check_lost(request_id, k, reason))

    async def _check_lost(self, request_id: str, down: int, reason: str) -> None:
        """Stage `down` went away: fail the requests no other stage still holds."""
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done():
            return
        states = await self._whereabouts.states(request_id)
        if lost_inside(states, down) and not pending.future.done():
            failure = StageFailure(
                f"stage {down} at {self.addresses[down]} went down ({reason}) with the request inside"
            )
            failure.lost = True  # type: ignore[attr-defined]
            pending.future.set_exception(failure)

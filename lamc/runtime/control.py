"""`lamc control`: one long-running controller for a pipeline's stage servers, and the
clients that follow it.

The controller watches every stage server (a subscription to each, as a client does) and
owns the switches: a stage down past the grace period moves the servers to the failover
plan compiled for losing its device (authenticated `Reconfigure` RPCs), and a lost
device healthy for a hold-down period brings them back. It serves the current plan (the
devices lost, and an epoch counting the switches) on `lamc.v1.Control/Plan`.

A client started with `controller=ADDRESS` (`lamc run --controller`) sends no
`Reconfigure` itself: when a stage goes down, when a stage fails a request because it
switched plans, and every half second, it asks the controller for the plan and, when the
epoch has moved on, reconnects to that plan's stages (requests caught in the switch are
sent again, as with a client's own failover).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from lamc.errors import RuntimeEnvironmentError
from lamc.runtime import wire
from lamc.runtime.security import auth_metadata, listen_on, open_channel, token_matches

log = logging.getLogger("lamc.control")

PLAN = f"/{wire.CONTROL_SERVICE}/Plan"


class Follow:
    """Mixed into `RemotePipeline`; the attributes below are the pipeline's."""

    controller: str | None
    endpoints: Any
    lost: tuple[str, ...]
    failover_grace_s: float
    full_manifest: Any
    _switch: asyncio.Task[None] | None
    _closed: bool
    _up: list[bool]

    if TYPE_CHECKING:  # `failover.Failover`'s, earlier in RemotePipeline's bases

        async def _switch_to(
            self,
            lost: tuple[str, ...],
            noticed: float,
            down: int | None = None,
            reconfigure: bool = True,
        ) -> None: ...

    def _init_follow(self, controller: str | None) -> None:
        self.controller = controller
        self._epoch = -1  # the controller's epoch this client last followed
        self._following: asyncio.Task[None] | None = None

    async def fetch_plan(self, wait_s: float | None = None) -> tuple[tuple[str, ...], int]:
        """The controller's plan now: (devices lost, epoch); with `wait_s`, waiting that
        long for a controller that is not up yet."""
        import grpc

        assert self.controller is not None
        channel = open_channel(self.controller, self.endpoints.tls)
        try:
            reply = await channel.unary_unary(
                PLAN,
                request_serializer=wire.PlanRequest.SerializeToString,
                response_deserializer=wire.PlanReply.FromString,
            )(
                wire.PlanRequest(),
                timeout=wait_s or 2.0,
                metadata=auth_metadata(self.endpoints.token),
                wait_for_ready=wait_s is not None,
            )
        except grpc.aio.AioRpcError as exc:
            raise RuntimeEnvironmentError(
                f"controller at {self.controller}: {exc.code().name}: {exc.details()}",
                hint="start it with `lamc control OUT --hosts hosts.yaml --listen HOST:PORT`",
            ) from None
        finally:
            await channel.close(None)
        if not reply.ok:
            raise RuntimeEnvironmentError(f"controller at {self.controller}: {reply.message}")
        return tuple(sorted(str(d) for d in reply.lost)), int(reply.epoch)

    def _follow_now(self, noticed: float) -> None:
        """Ask the controller now (unless a switch is in flight already)."""
        if self._switch is None or self._switch.done():
            self._switch = asyncio.get_running_loop().create_task(self._follow(noticed))

    async def _follow(self, noticed: float, wait_s: float | None = None) -> None:
        """Wait (up to `wait_s`) until the controller's epoch moves on, or every stage
        is up again; then take its plan if it differs from the one this client runs."""
        deadline = time.monotonic() + (wait_s or self.failover_grace_s * 4 + 30.0)
        while not self._closed:
            try:
                lost, epoch = await self.fetch_plan()
            except RuntimeEnvironmentError as exc:
                log.warning("%s", exc.message)
                lost, epoch = self.lost, self._epoch
            if epoch != self._epoch and lost != self.lost:
                self._epoch = epoch
                await self._switch_to(lost, noticed, reconfigure=False)
                return
            if epoch != self._epoch:
                self._epoch = epoch
            if all(self._up) and lost == self.lost and wait_s is None:
                return
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)

    async def _follow_loop(self) -> None:
        """Every half second: has the controller switched the plan under this client?"""
        while not self._closed:
            await asyncio.sleep(0.5)
            if self._switch is not None and not self._switch.done():
                continue
            try:
                lost, epoch = await self.fetch_plan()
            except RuntimeEnvironmentError:
                continue
            if epoch != self._epoch and lost != self.lost:
                self._switch = asyncio.get_running_loop().create_task(
                    self._follow(time.monotonic(), wait_s=1.0)
                )
            elif epoch != self._epoch:
                self._epoch = epoch


class Controller:
    """The `lamc control` process: a failover-driving client that sends no requests, and
    the `Plan` service its followers ask."""

    def __init__(self, pipeline: Any, listen: str, tls: Any = None) -> None:
        self.pipeline = pipeline
        self.listen = listen
        self.tls = tls
        self.token = pipeline.endpoints.token
        self.asked = 0
        self._server: Any = None

    async def plan(self, request: Any, context: Any) -> Any:
        if not token_matches(self.token, context.invocation_metadata()):
            return wire.PlanReply(ok=False, message="UNAUTHENTICATED: missing or wrong token")
        self.asked += 1
        return wire.PlanReply(
            ok=True, lost=list(self.pipeline.lost), epoch=len(self.pipeline.switches)
        )

    async def start(self) -> None:
        import grpc

        self._server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            wire.CONTROL_SERVICE,
            {
                "Plan": grpc.unary_unary_rpc_method_handler(
                    self.plan,
                    request_deserializer=wire.PlanRequest.FromString,
                    response_serializer=wire.PlanReply.SerializeToString,
                )
            },
        )
        self._server.add_generic_rpc_handlers((handler,))
        listen_on(self._server, self.listen, self.tls)
        await self._server.start()
        log.info("controller serving the plan on %s", self.listen)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)

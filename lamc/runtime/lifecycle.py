"""A stage server's life: start (listen, warm up, SERVING once its weights' hashes match),
serve until SIGTERM or SIGINT, then drain (every accepted request leaves, or is failed to
its client) and stop."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from lamc.runtime import wire
from lamc.runtime.security import listen_on, server_options
from lamc.runtime.tensors import warm_up_feeds

if TYPE_CHECKING:
    from lamc.runtime.server import StageService

log = logging.getLogger("lamc.serve")


async def start(self: StageService) -> None:
    """Listen, warm up, and say SERVING once the weights' hashes match."""
    import grpc
    from grpc_health.v1 import _async as health_aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    self.queue = asyncio.Queue(maxsize=self.queue_size)
    options = server_options(self.max_message)
    self._server = grpc.aio.server(options=options)
    handlers = {
        "Submit": grpc.unary_unary_rpc_method_handler(
            self.submit,
            request_deserializer=wire.SubmitRequest.FromString,
            response_serializer=wire.Ack.SerializeToString,
        ),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            self.subscribe,
            request_deserializer=wire.SubscribeRequest.FromString,
            response_serializer=wire.Delivery.SerializeToString,
        ),
        "Status": grpc.unary_unary_rpc_method_handler(
            self.status,
            request_deserializer=wire.StatusRequest.FromString,
            response_serializer=wire.StatusReply.SerializeToString,
        ),
        "Reconfigure": grpc.unary_unary_rpc_method_handler(
            self.reconfigure,
            request_deserializer=wire.ReconfigureRequest.FromString,
            response_serializer=wire.ReconfigureReply.SerializeToString,
        ),
        "Variant": grpc.unary_unary_rpc_method_handler(
            self.switch_variant,
            request_deserializer=wire.VariantRequest.FromString,
            response_serializer=wire.ReconfigureReply.SerializeToString,
        ),
    }
    self._server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(wire.SERVICE, handlers),)
    )
    self._health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
    await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await self._health.set(wire.SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    listen_on(self._server, self.listen, self.tls)
    await self._server.start()
    if self._next is not None:
        self._next.connect()
    try:
        try:
            self.runner, self.startup_ms["load"] = await asyncio.wrap_future(self._load.session)
        except Exception:
            # A tampered weight file is the reason to give for a session that failed.
            await asyncio.wrap_future(self._load.hashed)
            raise
        warm = time.perf_counter()
        await warm_up(self)
        self.startup_ms["warm-up"] = (time.perf_counter() - warm) * 1000
        # Nothing is served before every byte the stage loaded matched its hash.
        hashed_ms = await asyncio.wrap_future(self._load.hashed)
    except BaseException:
        await self._server.stop(None)
        raise
    self.startup_ms["weights hashed alongside"] = hashed_ms
    self.ready = True
    self._spawn(self._worker())
    await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
    await self._health.set(wire.SERVICE, health_pb2.HealthCheckResponse.SERVING)
    if self.standby_on:
        from lamc.runtime.reconfigure import prepare_standby

        self._spawn(prepare_standby(self))
    log.info(
        "stage %d serving on %s; cold start %.0f ms (%s)",
        self.index,
        self.listen,
        (time.perf_counter() - self.started) * 1000,
        ", ".join(f"{k} {v:.0f} ms" for k, v in self.startup_ms.items()),
    )


async def warm_up(self: StageService) -> None:
    """Run the engine once before reporting ready, on inputs of the smallest sizes the
    manifest allows (the cheapest run that shows the engine runs at all); at the plan's
    sizes where that fails."""
    loop = asyncio.get_running_loop()
    for smallest in (True, False):
        binding, feeds = warm_up_feeds(self.manifest, self.spec, smallest=smallest)
        try:
            await loop.run_in_executor(self._compute, self.runner.run, feeds)
            log.info("stage %d warmed up at %s", self.index, binding)
            return
        except Exception as exc:
            # An input whose valid values lamc could not record (one computed from data): the
            # engine is loaded either way, and the first real request warms it.
            reason = str(exc).splitlines()[0][:200]
            log.warning("stage %d warm-up at %s failed: %s", self.index, binding, reason)
    log.warning("stage %d warm-up skipped", self.index)


async def serve_forever(service: StageService) -> None:
    """Start, then run until SIGTERM or SIGINT, draining before exit."""
    import signal

    await service.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    waiter = asyncio.ensure_future(service.wait())
    stopper = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stopping.is_set():
        await drain(service)
    waiter.cancel()


async def drain(self: StageService, grace_s: float = 30.0) -> None:
    """Stop taking requests, let every accepted one leave, then stop."""
    from grpc_health.v1 import health_pb2

    self.draining = True
    await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await self._health.set(wire.SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = time.monotonic() + grace_s
    while self.ledger.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    # What could not leave in time is failed, not dropped: its client hears of it.
    for job in self.ledger.open_jobs():
        self.ledger.fail(job, f"stage {self.index} stopped before it could hand the request on")
    # Give subscribers a moment to receive the last deliveries.
    deadline = time.monotonic() + 2.0
    while self.ledger.undelivered() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await self._server.stop(grace=1.0)
    if self._next is not None:
        await self._next.close()
    self._compute.shutdown(wait=False)

"""A stage server's life: serve until SIGTERM or SIGINT, then drain (every accepted
request leaves, or is failed to its client) and stop."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from lamc.runtime import wire

if TYPE_CHECKING:
    from lamc.runtime.server import StageService


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

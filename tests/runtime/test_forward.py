"""The hand-off to the next stage, against a next stage that never answers."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from lamc.runtime import wire
from lamc.runtime.forward import Forwarder
from lamc.runtime.ledger import Job


async def _silent_stage() -> tuple[object, str, asyncio.Event]:
    """A server whose Submit accepts the call and never answers it."""
    import grpc

    called = asyncio.Event()

    async def submit(request: bytes, context: object) -> bytes:
        called.set()
        await asyncio.sleep(3600)
        return b""

    handler = grpc.method_handlers_generic_handler(
        wire.SERVICE,
        {
            "Submit": grpc.unary_unary_rpc_method_handler(
                submit, request_deserializer=None, response_serializer=None
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", called


def test_closing_the_forwarder_ends_a_send_in_flight_with_a_reason() -> None:
    """A reconfigure closes the old hand-off while a call to the (lost) next stage is in
    flight: the send ends at once with why, and is not left waiting out the deadline."""

    async def scenario() -> tuple[str | None, float]:
        server, address, called = await _silent_stage()
        forwarder = Forwarder(0, address, tls=None, token=None, max_message=1 << 20, codecs={})
        forwarder.connect()
        job = Job("r1", "c1", time.monotonic() + 30.0, {})
        try:
            sending = asyncio.get_running_loop().create_task(
                forwarder.send(job, {"x": np.zeros((2, 3), np.float32)})
            )
            await asyncio.wait_for(called.wait(), 10)
            started = time.monotonic()
            await forwarder.close()
            problem = await asyncio.wait_for(sending, 5)
            return problem, time.monotonic() - started
        finally:
            await server.stop(None)  # type: ignore[attr-defined]

    problem, took = asyncio.run(scenario())
    assert problem is not None and "reconfigured" in problem, problem
    assert took < 2.0, took


def test_cancelling_the_sender_itself_still_cancels() -> None:
    """Only a closed hand-off turns the call's cancellation into a reason: cancelling the
    task that sends (a stage stopping) goes on up."""

    async def scenario() -> bool:
        server, address, called = await _silent_stage()
        forwarder = Forwarder(0, address, tls=None, token=None, max_message=1 << 20, codecs={})
        forwarder.connect()
        job = Job("r1", "c1", time.monotonic() + 30.0, {})
        try:
            sending = asyncio.get_running_loop().create_task(forwarder.send(job, {}))
            await asyncio.wait_for(called.wait(), 10)
            sending.cancel()
            try:
                await sending
            except asyncio.CancelledError:
                return True
            return False
        finally:
            await forwarder.close()
            await server.stop(None)  # type: ignore[attr-defined]

    assert asyncio.run(scenario())

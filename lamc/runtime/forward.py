"""Handing a request on to the next stage: retried only while the next stage has not
accepted it (down, restarting, queue full), until the request's deadline; a request the
next stage accepted is never sent again from here."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from lamc.runtime import wire
from lamc.runtime.ledger import Job
from lamc.runtime.security import TlsConfig, auth_metadata, open_channel


class Forwarder:
    def __init__(
        self,
        stage: int,
        address: str,
        *,
        tls: TlsConfig | None,
        token: str | None,
        max_message: int,
        codecs: dict[str, str],
        delay_ms: float = 0.0,
        target: int | None = None,
    ) -> None:
        self.stage = stage  # the stage that forwards
        self.target = stage + 1 if target is None else target  # the stage it hands to
        self.address = address
        self.tls = tls
        self.token = token
        self.max_message = max_message
        self.codecs = codecs
        self.delay_ms = delay_ms  # emulated link latency on the way out (tests, benchmarks)
        self._channel: Any = None
        self._call: Any = None
        self.closed = False  # the stage was reconfigured: requests waiting here fail at once

    def connect(self) -> None:
        self._channel = open_channel(self.address, self.tls, self.max_message)
        self._call = self._channel.unary_unary(
            wire.method("Submit"),
            request_serializer=lambda b: b,
            response_deserializer=wire.Ack.FromString,
        )

    async def close(self) -> None:
        self.closed = True
        if self._channel is not None:
            await self._channel.close()

    async def send(self, job: Job, tensors: dict[str, np.ndarray]) -> str | None:
        """None once the next stage accepted the request, else why it did not."""
        import grpc

        message = wire.SubmitRequest(
            request_id=job.request_id,
            client_id=job.client_id,
            sequence_id=job.step.id if job.step else "",
            position=job.step.position if job.step else 0,
            end=job.step.end if job.step else False,
            attempt=job.attempt,
            variants=list(job.variants),
            tensors=[
                wire.encode(name, value, self.codecs.get(name, "raw"))
                for name, value in tensors.items()
            ],
        )
        if self.delay_ms > 0:
            await asyncio.sleep(self.delay_ms / 1000.0)
        following = f"stage {self.target} at {self.address}"
        backoff = 0.01
        last_problem = "no answer"
        while True:
            if self.closed:
                return (
                    f"stage {self.stage} was reconfigured before {following} accepted the request"
                )
            remaining = job.remaining_ms()
            if remaining <= 0:
                return (
                    f"{following} did not accept the request before its deadline ({last_problem})"
                )
            message.timeout_ms = remaining
            try:
                ack = await self._call(
                    message.SerializeToString(),
                    timeout=remaining / 1000.0,
                    metadata=auth_metadata(self.token),
                    wait_for_ready=False,
                )
            except asyncio.CancelledError:
                # Closing the channel (a reconfigure) cancels the call in flight; a
                # cancellation of this task itself goes on up.
                task = asyncio.current_task()
                if self.closed and (task is None or not task.cancelling()):
                    continue  # answered at the top of the loop
                raise
            except grpc.aio.UsageError as exc:  # a closed channel (a reconfigure closed it)
                if self.closed:
                    continue  # answered at the top of the loop
                return f"{following}: {exc}"
            except grpc.aio.AioRpcError as exc:
                if self.closed:
                    continue  # answered at the top of the loop
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    return f"{following}: {exc.code().name}: {exc.details()}"
                last_problem = f"{exc.code().name}: {exc.details()}"
            else:
                if ack.accepted:
                    return None
                if ack.code not in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                    return f"{following} refused it: {ack.code}: {ack.message}"
                last_problem = f"{ack.code}: {ack.message}"
            await asyncio.sleep(min(backoff, remaining / 1000.0))
            backoff = min(backoff * 2, 0.5)

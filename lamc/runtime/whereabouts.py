"""Where a request is: every stage's record of it (queued, running, forwarding, handed on,
delivered, failed, or none), asked over each stage's Status RPC. The client uses it to
tell a slow request from a lost one, and to name where it was lost."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from lamc.runtime import wire
from lamc.runtime.security import auth_metadata

HOLDING = ("queued", "running", "forwarding")
PASSED = ("forwarded", "delivered", "failed")


class Whereabouts:
    def __init__(
        self, channels: Sequence[Any], addresses: Sequence[str], token: str | None
    ) -> None:
        self.channels = channels
        self.addresses = addresses
        self.token = token

    async def states(self, request_id: str) -> list[tuple[str, str]]:
        """(state, detail) of the request at every stage, in stage order."""
        import grpc

        async def ask(k: int) -> tuple[str, str]:
            call = self.channels[k].unary_unary(
                wire.method("Status"),
                request_serializer=wire.StatusRequest.SerializeToString,
                response_deserializer=wire.StatusReply.FromString,
            )
            try:
                reply = await call(
                    wire.StatusRequest(request_id=request_id),
                    timeout=0.5,
                    metadata=auth_metadata(self.token),
                )
                return reply.state, reply.detail
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return "no answer", "it did not answer within 0.5 s (stalled?)"
                return "unreachable", f"{exc.code().name}: {exc.details()}"

        return list(await asyncio.gather(*(ask(k) for k in range(len(self.addresses)))))

    async def trace(self, request_id: str) -> str:
        """Where a request is (or was lost), for a timeout's error message."""
        states = await self.states(request_id)
        for k, (state, detail) in enumerate(states):
            where = f"stage {k} at {self.addresses[k]}"
            if state in ("no answer", "unreachable"):
                return f"lost at {where}: {detail}"
            if state in HOLDING:
                return f"still {state} at {where}" + (f" ({detail})" if detail else "")
            if state == "unknown":
                previous = f" after stage {k - 1} handed it on" if k > 0 else ""
                return f"lost at {where}: it has no record of the request{previous}"
        return "every stage handed it on, but the answer did not arrive"


def lost_inside(states: Sequence[tuple[str, str]], down: int) -> bool:
    """Whether a request was inside stage `down` when it went away: no live stage holds
    it, and none at or past `down` has handed it on."""
    holders = [k for k, (state, _) in enumerate(states) if state in HOLDING]
    beyond = max((k for k, (state, _) in enumerate(states) if state in PASSED), default=-1)
    if holders and all(k != down for k in holders):
        return False  # still on its way through live stages
    return beyond < down

"""The client of a pipeline served across hosts (`lamc run OUT --hosts hosts.yaml`).

It submits each request to stage 0 and waits for the answer on its subscription to the
last stage. It subscribes to every stage, so a stage that goes down is noticed at once,
and a stage that fails a request names itself and its host. A request that times out is
traced through the stages (`whereabouts`) so the error says where it was lost. Every
accepted request ends in a result or an error (accepted == succeeded + failed).

Requests lost with a stage are sent again only when every stage is stateless (no KV
cache; re-running a stateful stage would apply a step twice).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamc.errors import UsageError
from lamc.runtime import wire
from lamc.runtime.adapt import Adapt, Answer
from lamc.runtime.control import Follow
from lamc.runtime.failover import Failover, StageFailure
from lamc.runtime.hosts import Endpoints
from lamc.runtime.kvcache import Step, local_inputs, local_outputs, unsupported
from lamc.runtime.security import auth_metadata, open_channel
from lamc.runtime.tensors import TensorMismatch, check_all
from lamc.runtime.whereabouts import Whereabouts
from lamc.verify import read_manifest


class Rejected(UsageError):
    """Stage 0 did not accept the request (queue full, invalid input, shutting down)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, np.ndarray]]
    deadline: float
    submitted: float
    outputs: tuple[str, ...] = ()


class RemotePipeline(Failover, Adapt, Follow):
    def __init__(
        self,
        out_dir: Path | str,
        endpoints: Endpoints,
        *,
        timeout_s: float = 30.0,
        retry_stateless: bool = True,
        failover: bool = False,
        failover_grace_s: float = 0.5,
        failback_hold_s: float = 5.0,
        without: Sequence[str] = (),
        slo_ms: float | None = None,
        max_error: float | None = None,
        controller: str | None = None,
        observe_servers: bool = False,
    ) -> None:
        self.full_manifest = self.manifest = read_manifest(Path(out_dir))
        self.full_manifest.refuse_replicated("a pipeline over gRPC stage servers")
        if without:  # servers started on a failover plan (`lamc serve --without`)
            self.manifest = self.full_manifest.without(without)
        self.endpoints = endpoints
        self.addresses = [endpoints.address(i) for i in range(len(self.manifest.stages))]
        # Warm re-planning: a stage down for longer than the grace period switches the
        # pipeline to the failover plan made at compile time for losing its device.
        self.failover = failover
        self.failover_grace_s = failover_grace_s
        self.by_device = {s.device: self.addresses[s.index] for s in self.manifest.stages}
        self.lost: tuple[str, ...] = tuple(sorted(without))
        self.switches: list[dict[str, Any]] = []
        self._switch: asyncio.Task[None] | None = None
        self._return: asyncio.Task[None] | None = None
        self.failback_hold_s = failback_hold_s
        self._plan_since = 0.0  # when the current plan took over (monotonic)
        self.timeout_s = timeout_s
        self.stateless = all(s.kv_cache is None for s in self.manifest.stages)
        self.local_kv = unsupported(self.manifest)  # None: caches can stay in their stages
        self.step_inputs = local_inputs(self.manifest)
        self.step_outputs = local_outputs(self.manifest)
        self.retry = retry_stateless and self.stateless
        self._client_secret = uuid.uuid4().hex + uuid.uuid4().hex  # sent on Subscribe only
        self.client_id = wire.client_id_of(self._client_secret)
        self.counts: collections.Counter[str] = collections.Counter()
        self.codec_in = {
            t.name: t.codec for e in self.manifest.edges if e.source == -1 for t in e.tensors
        }
        self._pending: dict[str, _Pending] = {}
        self._up = [False] * len(self.addresses)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lamc-client", daemon=True
        )
        self._channels: list[Any] = []
        self._whereabouts = Whereabouts(self._channels, self.addresses, endpoints.token)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Under load (p95 over `slo_ms`): faster variants of the stages, within `max_error`;
        # `observe_servers`: the p95 the stage servers report (a controller sends nothing).
        self._init_adapt(slo_ms, max_error, observe_servers=observe_servers)
        # With a controller (`lamc control`), it switches the servers; this client follows.
        self._init_follow(controller)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(
                timeout=timeout_s + 10.0
            )
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------- public API

    def submit(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
        sequence: Step | None = None,
    ) -> concurrent.futures.Future[dict[str, np.ndarray]]:
        """Start a request: a future of the outputs, or of StageFailure/Rejected. With
        `sequence` (a decoder step) the stages keep their own KV caches."""
        if sequence is not None and self.local_kv is not None:
            raise UsageError(f"stage-local KV caches are not possible: {self.local_kv}")
        return asyncio.run_coroutine_threadsafe(
            self._request(dict(feeds), timeout_s or self.timeout_s, sequence), self._loop
        )

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
        sequence: Step | None = None,
    ) -> dict[str, np.ndarray]:
        return self.submit(feeds, timeout_s=timeout_s, sequence=sequence).result()

    def run_many(
        self,
        requests: Sequence[Mapping[str, np.ndarray]],
        *,
        in_flight: int = 8,
        timeout_s: float | None = None,
    ) -> list[dict[str, np.ndarray] | BaseException]:
        """Many requests with up to `in_flight` outstanding at once (keeps every stage busy)."""

        async def all_of() -> list[dict[str, np.ndarray] | BaseException]:
            gate = asyncio.Semaphore(in_flight)

            async def one(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                async with gate:
                    return await self._request(dict(feeds), timeout_s or self.timeout_s, None)

            return list(await asyncio.gather(*(one(f) for f in requests), return_exceptions=True))

        return asyncio.run_coroutine_threadsafe(all_of(), self._loop).result()

    def hop_times(self, last: int) -> list[tuple[list[float], list[float]]]:
        """Per stage of the current plan: the engine's ms and the hand-off's ms of its
        latest `last` hops, as the stage servers measured them ([] where one does not
        answer)."""

        async def all_of() -> list[Any]:
            return list(
                await asyncio.gather(*(self.stage_status(k) for k in range(len(self.addresses))))
            )

        replies = asyncio.run_coroutine_threadsafe(all_of(), self._loop).result(timeout=30)
        return [
            (list(r.compute_ms)[-last:], list(r.handoff_ms)[-last:]) if r is not None else ([], [])
            for r in replies
        ]

    def reachable(self) -> bool:
        """Every stage server of the current plan is connected and SERVING."""
        return all(self._up)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            for task in (*self._tasks, self._return, self._switch, self._adapting, self._following):
                if task is not None:
                    task.cancel()
            for channel in self._channels:
                await channel.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> RemotePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------- setup

    async def _start(self) -> None:
        if self.controller is None:
            await self._connect()
        else:  # start on the plan the servers run now
            lost, self._epoch = await self.fetch_plan(wait_s=self.timeout_s)
            if lost != self.lost:
                await self._switch_to(lost, time.monotonic(), reconfigure=False)
            else:
                await self._connect()
            self._following = asyncio.get_running_loop().create_task(self._follow_loop())
        if self.slo_ms is not None:
            self._adapting = asyncio.get_running_loop().create_task(self._adapt())

    async def _connect(self) -> None:
        """Channels and subscriptions to the stages of the current plan."""

        limit = wire.max_message_bytes(self.manifest)
        tls = self.endpoints.tls
        for address in self.addresses:
            self._channels.append(open_channel(address, tls, limit))
        connected = [asyncio.Event() for _ in self.addresses]
        for k in range(len(self.addresses)):
            self._tasks.append(
                asyncio.get_running_loop().create_task(self._subscription(k, connected[k]))
            )
        try:
            await asyncio.wait_for(
                asyncio.gather(*(event.wait() for event in connected)), timeout=self.timeout_s
            )
        except asyncio.TimeoutError:
            down = [
                f"stage {k} at {self.addresses[k]}"
                for k, event in enumerate(connected)
                if not event.is_set()
            ]
            raise StageFailure(
                f"cannot reach {', '.join(down)}",
                hint="start it with `lamc serve OUT --stage K --listen HOST:PORT`",
            ) from None

    # ------------------------------------------------------------------------ requests

    async def _request(
        self, feeds: dict[str, np.ndarray], timeout_s: float, sequence: Step | None
    ) -> dict[str, np.ndarray]:
        started = time.monotonic()
        deadline = started + timeout_s
        attempt = 0
        while True:
            await self._switched()
            try:
                answer = await self._attempt(feeds, deadline, sequence, attempt)
                self._observe(time.monotonic() - started)
                return answer
            except StageFailure as exc:
                lost = getattr(exc, "lost", False)
                if self.retry and lost and attempt == 0 and time.monotonic() < deadline - 0.05:
                    attempt += 1
                    self.counts["retried"] += 1
                    # A stage is down: the retry goes to the failover plan once it is up.
                    await asyncio.sleep(self.failover_grace_s if self.failover else 0)
                    continue
                raise

    async def _attempt(
        self,
        feeds: dict[str, np.ndarray],
        deadline: float,
        sequence: Step | None,
        attempt: int,
    ) -> dict[str, np.ndarray]:
        import grpc

        manifest = self.manifest
        takes, gives = manifest.inputs, manifest.outputs
        if sequence is not None:
            takes, gives = self.step_inputs, self.step_outputs
        unknown = sorted(set(feeds) - set(takes))
        if unknown:
            raise TensorMismatch(
                f"input: unknown tensor(s) {', '.join(unknown)}; the model takes {', '.join(takes)}"
            )
        # Each input to the stage it enters at: stage 0 of a chain; in a branch-parallel
        # pipeline, the first stage of each branch that reads it (and the join).
        entries = (
            {e.target: [t.name for t in e.tensors] for e in manifest.edges if e.source == -1}
            if manifest.is_dag
            else {0: [n for n in manifest.stages[0].receives if n in set(takes)]}
        )
        wanted = sorted({n for names in entries.values() for n in names})
        inputs = check_all(wanted, manifest.tensors, feeds, manifest.dims, {}, "input")
        request_id = uuid.uuid4().hex
        remaining = deadline - time.monotonic()
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), deadline, time.monotonic(), gives)
        self._pending[request_id] = pending
        self.counts["submitted"] += 1
        acks = await asyncio.gather(
            *(
                self._submit_part(
                    stage,
                    wire.SubmitRequest(
                        request_id=request_id,
                        client_id=self.client_id,
                        timeout_ms=remaining * 1000.0,
                        sequence_id=sequence.id if sequence else "",
                        position=sequence.position if sequence else 0,
                        end=sequence.end if sequence else False,
                        attempt=attempt,
                        tensors=[
                            wire.encode(name, inputs[name], self.codec_in.get(name, "raw"))
                            for name in names
                        ],
                    ),
                    remaining,
                )
                for stage, names in sorted(entries.items())
            ),
            return_exceptions=True,
        )
        for stage, ack in zip(sorted(entries), acks):
            if isinstance(ack, BaseException):
                self._pending.pop(request_id, None)
                self.counts["rejected"] += 1
                if isinstance(ack, grpc.aio.AioRpcError):
                    raise StageFailure(
                        f"stage {stage} at {self.addresses[stage]}: {ack.code().name}: "
                        f"{ack.details()}"
                    ) from None
                raise ack
            if not ack.accepted:
                self._pending.pop(request_id, None)
                self.counts["rejected"] += 1
                if ack.code == "INVALID_ARGUMENT":
                    raise TensorMismatch(ack.message)
                raise Rejected(ack.code, f"stage {stage} at {self.addresses[stage]}: {ack.message}")
        self.counts["accepted"] += 1
        timer = loop.call_later(
            max(deadline - time.monotonic(), 0.0),
            lambda: loop.create_task(self._expire(request_id)),
        )
        try:
            result = await pending.future
            self.counts["succeeded"] += 1
            return result
        except BaseException:
            self.counts["failed"] += 1
            raise
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)

    async def _submit_part(self, stage: int, message: Any, remaining: float) -> Any:
        call = self._channels[stage].unary_unary(
            wire.method("Submit"),
            request_serializer=wire.SubmitRequest.SerializeToString,
            response_deserializer=wire.Ack.FromString,
        )
        return await call(
            message, timeout=max(remaining, 0.001), metadata=auth_metadata(self.endpoints.token)
        )

    def _on_delivery(self, delivery: Any) -> None:
        pending = self._pending.get(delivery.request_id)
        if pending is None or pending.future.done():
            self.counts["late"] += 1
            return
        if delivery.error:
            failure = StageFailure(f"stage {delivery.stage} at {delivery.where}: {delivery.error}")
            # A request of the plan before a switch (or caught in one) that failed before
            # any stage applied it is sent again, on the new plan.
            switching = self._switch is not None and not self._switch.done()
            # A request the stage never ran because a controller switched the plan under
            # this client: sent again once the client follows.
            followed = bool(delivery.replanned) and self.controller is not None
            failure.lost = followed or (  # type: ignore[attr-defined]
                bool(delivery.retryable) and (switching or pending.submitted < self._plan_since)
            )
            if followed:
                self._follow_now(time.monotonic())
            pending.future.set_exception(failure)
            return
        try:
            outputs = {t.name: wire.decode(t) for t in delivery.tensors}
            outputs = check_all(
                pending.outputs or self.manifest.outputs,
                self.manifest.tensors,
                outputs,
                self.manifest.dims,
                {},
                "output",
            )
        except (ValueError, TensorMismatch) as exc:
            pending.future.set_exception(
                StageFailure(
                    f"stage {delivery.stage} at {delivery.where} answered with a bad tensor: {exc}"
                )
            )
            return
        answer = Answer(outputs)
        answer.variants = tuple(str(v) for v in delivery.variants)
        pending.future.set_result(answer)

    def _fail_all(self, reason: str) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(StageFailure(reason))

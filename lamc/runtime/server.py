"""One stage as a gRPC microservice (`lamc serve OUT --stage K --listen HOST:PORT`).

Requests flow one way: the client submits to stage 0; each stage runs its engine and
submits its outputs straight to the next stage; the last stage delivers the answer to the
client over the client's subscription stream. Any stage that cannot carry a request on
delivers a failure naming itself to the client the same way, so an accepted request is
always answered or failed.

- `Submit` checks the token, the deadline and every tensor against the manifest, then
  enqueues; a full queue answers RESOURCE_EXHAUSTED at once (it never blocks).
- One worker runs the engine, request after request; while it runs the next request,
  earlier outputs are being forwarded.
- Forwarding (`forward.Forwarder`) retries only while the next stage has *not accepted*
  the request (it is down, restarting, or its queue is full), until the request's
  deadline. A request a stage accepted is never sent again from here.
- The ledger (`ledger.Ledger`) delivers every answer or failure to the client that sent
  the request, and counts them.
- Health (the standard grpc.health.v1 service) is SERVING only after the engine is loaded
  and has run once; on SIGTERM it turns NOT_SERVING, new requests are refused, and the
  server stops once every accepted request has left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lamc.errors import UsageError
from lamc.manifest import StageSpec
from lamc.runtime import wire
from lamc.runtime.executor import StageRunner
from lamc.runtime.forward import Forwarder
from lamc.runtime.kvcache import CacheLost, StageCaches, Step
from lamc.runtime.ledger import Job, Ledger
from lamc.runtime.loading import StageLoad
from lamc.runtime.security import TlsConfig, check_bind, token_matches
from lamc.runtime.tensors import TensorMismatch, check_all

log = logging.getLogger("lamc.serve")


class StageService:
    runner: StageRunner  # built on the loader's thread; set by `start`

    def __init__(
        self,
        out_dir: Path,
        index: int,
        *,
        listen: str,
        next_address: str | None = None,
        queue_size: int = 16,
        tls: TlsConfig | None = None,
        insecure: bool = False,
        token: str | None = None,
        providers: tuple[str, ...] | None = None,
        threads: int | None = None,
        next_tls: TlsConfig | None = None,
        delay_ms: float = 0.0,
        max_sequences: int = 64,
        max_deadline_s: float = 600.0,
        without: tuple[str, ...] = (),
        standby: bool = False,
        load: StageLoad | None = None,
    ) -> None:
        check_bind(listen, tls, insecure)
        if load is None:
            load = StageLoad(out_dir, index, without=without, providers=providers, threads=threads)
        self.full_manifest = load.full_manifest
        self.full_manifest.refuse_replicated("a gRPC stage server")
        self.manifest = load.manifest
        # What a reconfigure needs: every plan of the artifact, and the files checked so far.
        self.out_dir = out_dir
        self.verified = {f.path for f in self.manifest.stages[index].files}
        self.providers, self.threads, self.max_sequences = providers, threads, max_sequences
        self.delay_ms = delay_ms
        self.lost: tuple[str, ...] = tuple(without)
        self.spec: StageSpec = load.spec
        self.device = self.spec.device
        self.index = index
        self.last = index == len(self.manifest.stages) - 1
        if not self.last and next_address is None:
            raise UsageError(
                f"stage {index} needs the address of stage {self.manifest.successor(index)}",
                hint="pass --next HOST:PORT or --hosts hosts.yaml",
            )
        # A branch-parallel join takes a request once every stage (and the client) that
        # sends it a part has: the parts wait here, each until its request's deadline.
        self.parts_needed = len(self.manifest.sources(index)) if self.manifest.is_dag else 1
        self._parts: dict[str, tuple[float, dict[str, np.ndarray], int]] = {}
        self.listen = listen
        self.next_address = next_address
        self.token = token
        self.tls = tls
        self.next_tls = next_tls
        self.queue_size = queue_size
        self.max_deadline_ms = max_deadline_s * 1000.0
        self.max_message = wire.max_message_bytes(self.manifest)
        # The weights are hashed while the session is built; `start` waits for both.
        self._load = load
        self.started = load.started
        self.startup_ms = {"verify": (load.verified - load.started) * 1000}
        self.ready = False  # the session built, warmed up and its weights' hashes matched
        # The sequences whose KV caches this stage holds (touched by the compute thread only).
        self.caches = StageCaches(self.manifest, self.spec, capacity=max_sequences)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{index}")
        self.queue: asyncio.Queue[Job] | None = None
        self.ledger = Ledger(index, listen)
        self.counts = self.ledger.counts
        self.draining = False
        self._server: Any = None
        self._health: Any = None
        self._next = (
            self.forwarder(index, next_address)
            if next_address is not None and not self.last
            else None
        )
        self._tasks: set[asyncio.Task[None]] = set()
        # Bumped by every `Reconfigure`: a request accepted under an older plan is failed
        # (and so sent again by the client), never run by the new plan's stage.
        self.plan = 0
        # `Variant`: the build of this stage that runs ("": the plan's own), and the
        # sessions of the builds loaded so far (switching back and forth loads nothing).
        self.variant = ""
        self.builds: dict[str, StageRunner] = {}
        # `--standby`: sessions of the other plans' stages this device runs, built in the
        # background once serving (by stage graph path), so a reconfigure only swaps.
        self.standby_on = standby
        self.standby: dict[str, StageRunner] = {}

    def forwarder(self, index: int, address: str) -> Forwarder:
        """The hand-off from stage `index` (of the current plan) to the next at `address`."""
        target = self.manifest.successor(index)
        return Forwarder(
            index,
            address,
            tls=self.next_tls,
            token=self.token,
            max_message=self.max_message,
            codecs=self._codecs(index, target),
            delay_ms=self.delay_ms,
            target=target,
        )

    def _codecs(self, source: int, target: int) -> dict[str, str]:
        edge = next(
            (e for e in self.manifest.edges if e.target == target and e.source == source), None
        )
        return {t.name: t.codec for t in edge.tensors} if edge else {}

    # ------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen, warm up, and say SERVING once the weights' hashes match."""
        from lamc.runtime.lifecycle import start

        await start(self)

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------------------- RPCs

    async def submit(self, request: Any, context: Any) -> Any:
        if not token_matches(self.token, context.invocation_metadata()):
            self.counts["unauthenticated"] += 1
            return wire.Ack(
                accepted=False, code="UNAUTHENTICATED", message="missing or wrong token"
            )
        if self.draining:
            self.counts["rejected"] += 1
            return wire.Ack(
                accepted=False, code="UNAVAILABLE", message=f"stage {self.index} is shutting down"
            )
        timeout_ms = float(request.timeout_ms)
        if not math.isfinite(timeout_ms):
            self.counts["invalid"] += 1
            return wire.Ack(
                accepted=False,
                code="INVALID_ARGUMENT",
                message=f"the deadline must be a finite number of milliseconds, got {timeout_ms}",
            )
        # A deadline past the server's maximum is cut to it: every request ends in bounded time.
        timeout_ms = min(timeout_ms, self.max_deadline_ms)
        if timeout_ms <= 0:
            self.counts["late"] += 1
            return wire.Ack(
                accepted=False,
                code="DEADLINE_EXCEEDED",
                message=f"the request reached stage {self.index} after its deadline",
            )
        step = (
            Step(request.sequence_id, int(request.position), bool(request.end))
            if request.sequence_id
            else None
        )
        receives = self.caches.receives if step is not None else self.spec.receives
        binding: dict[str, int] = {}
        try:
            arriving = {t.name: wire.decode(t) for t in request.tensors}
            unknown = sorted(set(arriving) - set(receives))
            if unknown:
                raise TensorMismatch(f"stage {self.index}: unknown tensor(s) {', '.join(unknown)}")
            if self.parts_needed > 1:
                whole = self._join(request, arriving, timeout_ms)
                if isinstance(whole, wire.Ack):
                    return whole
                arriving = whole
            tensors = check_all(
                receives,
                self.manifest.tensors,
                arriving,
                self.manifest.dims,
                binding,
                f"stage {self.index}",
            )
        except (ValueError, TensorMismatch) as exc:
            self.counts["invalid"] += 1
            return wire.Ack(accepted=False, code="INVALID_ARGUMENT", message=str(exc))
        job = Job(
            request.request_id,
            request.client_id,
            time.monotonic() + timeout_ms / 1000.0,
            tensors,
            step,
            request.attempt,
            binding=binding,
            plan=self.plan,
            variants=tuple(str(v) for v in request.variants[: self.index]),
        )
        assert self.queue is not None
        try:
            # The bound covers every request the stage holds (waiting, running or being
            # handed on), so a slow next hop pushes back on the previous one.
            if self.ledger.in_flight >= self.queue_size:
                raise asyncio.QueueFull
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counts["rejected"] += 1
            return wire.Ack(
                accepted=False,
                code="RESOURCE_EXHAUSTED",
                message=f"stage {self.index} queue is full ({self.queue_size} requests)",
            )
        self.ledger.accepted(job)
        return wire.Ack(accepted=True)

    def _join(
        self, request: Any, arriving: dict[str, np.ndarray], timeout_ms: float
    ) -> dict[str, np.ndarray] | Any:
        """One part of a request at a join: the whole request once its last part is here,
        else the answer to this part (held, refused as a duplicate, or no room)."""
        held = self._parts.get(request.request_id)
        if held is None:
            if len(self._parts) >= self.queue_size:
                self.counts["rejected"] += 1
                return wire.Ack(
                    accepted=False,
                    code="RESOURCE_EXHAUSTED",
                    message=f"stage {self.index} holds {self.queue_size} incomplete requests",
                )
            deadline = time.monotonic() + timeout_ms / 1000.0
            held = (deadline, {}, 0)
            asyncio.get_running_loop().call_later(
                timeout_ms / 1000.0, self._expire_parts, request.request_id, request.client_id
            )
        deadline, tensors, parts = held
        twice = sorted(set(arriving) & set(tensors))
        if twice:
            raise TensorMismatch(f"stage {self.index}: {', '.join(twice)} arrived twice")
        tensors.update(arriving)
        if parts + 1 < self.parts_needed:
            self._parts[request.request_id] = (deadline, tensors, parts + 1)
            self.counts["parts"] += 1
            return wire.Ack(accepted=True)
        self._parts.pop(request.request_id, None)
        return tensors

    def _expire_parts(self, request_id: str, client_id: str) -> None:
        """A join's request whose parts did not all arrive by its deadline fails here."""
        held = self._parts.pop(request_id, None)
        if held is None:
            return
        _, tensors, parts = held
        job = Job(request_id, client_id, time.monotonic(), tensors)
        self.ledger.accepted(job)
        self.ledger.fail(
            job,
            f"stage {self.index} received {parts} of the {self.parts_needed} parts of the "
            "request before its deadline",
        )

    async def subscribe(self, request: Any, context: Any) -> AsyncIterator[Any]:
        if not token_matches(self.token, context.invocation_metadata()):
            import grpc

            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        if len(request.client_secret) < 32:
            import grpc

            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "subscribe with a client secret of at least 32 characters",
            )
        client = wire.client_id_of(request.client_secret)
        queue = self.ledger.subscribe(client)
        # Headers now, so that the client knows it is subscribed before the first delivery.
        await context.send_initial_metadata(())
        try:
            while True:
                yield await queue.get()
        finally:
            self.ledger.unsubscribe(client, queue)

    async def status(self, request: Any, context: Any) -> Any:
        if not token_matches(self.token, context.invocation_metadata()):
            return wire.StatusReply(state="unauthenticated", stage=self.index)
        if not request.request_id:  # the stage's load, for a controller
            return wire.StatusReply(
                state="serving",
                stage=self.index,
                in_flight=self.ledger.in_flight,
                residence_p95_ms=self.ledger.residence_p95_ms(),
                compute_ms=list(self.ledger.compute_ms),
                handoff_ms=list(self.ledger.handoff_ms),
            )
        state, detail = self.ledger.states.get(request.request_id, ("unknown", ""))
        return wire.StatusReply(state=state, detail=detail, stage=self.index)

    async def reconfigure(self, request: Any, context: Any) -> Any:
        from lamc.runtime.reconfigure import reconfigure

        return await reconfigure(self, request, context)

    async def switch_variant(self, request: Any, context: Any) -> Any:
        from lamc.runtime.reconfigure import switch_variant

        return await switch_variant(self, request, context)

    # --------------------------------------------------------------------------- work

    async def _worker(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            if time.monotonic() >= job.deadline:
                self.ledger.fail(job, f"deadline exceeded while queued at stage {self.index}")
                continue
            if job.plan != self.plan:
                self.ledger.fail(
                    job,
                    f"stage {self.index} was reconfigured to another plan before it ran",
                    replanned=True,
                )
                continue
            self.ledger.state(job.request_id, "running")
            # One plan's runner, caches and hand-off together: a `Reconfigure` waits on the
            # compute thread for this hop, and whatever it swaps in is not used for it.
            runner, manifest, caches, last, forwarder, build = (
                self.runner,
                self.manifest,
                self.caches,
                self.last,
                self._next,
                self.variant or self.spec.precision,
            )
            try:
                started = time.perf_counter()
                _, sends = await loop.run_in_executor(
                    self._compute, runner.hop, manifest, job.tensors, job.binding, caches, job.step
                )
                self.ledger.compute_ms.append((time.perf_counter() - started) * 1000)
            except CacheLost as exc:
                self.ledger.fail(job, str(exc))
                continue
            except Exception as exc:
                self.ledger.fail(
                    job,
                    f"stage {self.index} engine failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                )
                continue
            job.variants = (*job.variants, f"{self.index}:{build}")
            if last:
                self.ledger.result(job, sends)
            else:
                assert forwarder is not None
                self._spawn(self._forward(job, sends, forwarder))

    async def _forward(
        self, job: Job, tensors: dict[str, np.ndarray], forwarder: Forwarder
    ) -> None:
        """Hand the request to the next stage; retry only while it has not accepted it."""
        self.ledger.state(job.request_id, "forwarding")
        following = f"stage {forwarder.target} at {forwarder.address}"
        try:
            started = time.perf_counter()
            problem = await forwarder.send(job, tensors)
            if problem is None:
                self.ledger.handoff_ms.append((time.perf_counter() - started) * 1000)
        except asyncio.CancelledError:
            self.ledger.fail(job, f"stage {self.index} stopped while handing it to {following}")
            raise
        except Exception as exc:  # never leave a request "forwarding" for ever
            problem = f"handing it to {following} failed: {type(exc).__name__}: {exc}"
        if problem is None:
            self.ledger.forwarded(job, f"to {following}")
        else:
            # A hand-off closed by a reconfigure: the next stage never took it.
            self.ledger.fail(job, problem, replanned=forwarder.closed)

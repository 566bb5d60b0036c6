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

from lamc.dims import eval_dim
from lamc.errors import UsageError
from lamc.manifest import StageSpec, verify
from lamc.runtime import wire
from lamc.runtime.executor import StageRunner, load_stage
from lamc.runtime.forward import Forwarder
from lamc.runtime.kvcache import CacheLost, StageCaches, Step
from lamc.runtime.ledger import Job, Ledger
from lamc.runtime.security import TlsConfig, check_bind, server_options, token_matches
from lamc.runtime.tensors import TensorMismatch, check_all

log = logging.getLogger("lamc.serve")


class StageService:
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
    ) -> None:
        check_bind(listen, tls, insecure)
        started = time.perf_counter()
        # Hashes this stage's files only (of the failover plan for losing `without`).
        self.full_manifest = verify(out_dir, stage=index, without=without)
        self.manifest = self.full_manifest.without(without) if without else self.full_manifest
        # What a reconfigure needs: every plan of the artifact, and the files checked so far.
        self.out_dir = out_dir
        self.verified = {f.path for f in self.manifest.stages[index].files}
        self.providers, self.threads, self.max_sequences = providers, threads, max_sequences
        self.delay_ms = delay_ms
        self.lost: tuple[str, ...] = tuple(without)
        self.spec: StageSpec = self.manifest.stages[index]
        self.device = self.spec.device
        self.index = index
        self.last = index == len(self.manifest.stages) - 1
        if not self.last and next_address is None:
            raise UsageError(
                f"stage {index} needs the address of stage {index + 1}",
                hint="pass --next HOST:PORT or --hosts hosts.yaml",
            )
        self.listen = listen
        self.next_address = next_address
        self.token = token
        self.tls = tls
        self.next_tls = next_tls
        self.queue_size = queue_size
        self.max_deadline_ms = max_deadline_s * 1000.0
        self.max_message = wire.max_message_bytes(self.manifest)
        verified = time.perf_counter()
        self.runner: StageRunner = load_stage(
            out_dir, self.spec, providers=providers, threads=threads
        )
        self.started = started
        self.startup_ms = {
            "verify": (verified - started) * 1000,
            "load": (time.perf_counter() - verified) * 1000,
        }
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
            Forwarder(
                index,
                next_address,
                tls=next_tls,
                token=token,
                max_message=self.max_message,
                codecs=self._codecs(index + 1),
                delay_ms=delay_ms,
            )
            if next_address is not None and not self.last
            else None
        )
        self._tasks: set[asyncio.Task[None]] = set()

    def _codecs(self, edge_index: int) -> dict[str, str]:
        edge = next((e for e in self.manifest.edges if e.target == edge_index), None)
        return {t.name: t.codec for t in edge.tensors} if edge else {}

    # ------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
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
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(wire.SERVICE, handlers),)
        )
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(wire.SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.tls is not None:
            port = self._server.add_secure_port(self.listen, self.tls.server_credentials())
        else:
            port = self._server.add_insecure_port(self.listen)
        if port == 0:
            raise UsageError(f"cannot listen on {self.listen} (address in use or not available)")
        await self._server.start()
        if self._next is not None:
            self._next.connect()
        warm = time.perf_counter()
        await self._warm_up()
        self.startup_ms["warm-up"] = (time.perf_counter() - warm) * 1000
        self._spawn(self._worker())
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(wire.SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "stage %d serving on %s; cold start %.0f ms (%s)",
            self.index,
            self.listen,
            (time.perf_counter() - self.started) * 1000,
            ", ".join(f"{k} {v:.0f} ms" for k, v in self.startup_ms.items()),
        )

    async def _warm_up(self) -> None:
        """Run the engine once on inputs of the smallest sizes before reporting ready."""
        binding = {name: max(bounds.min, 1) for name, bounds in self.manifest.dims.items()}
        binding.update(
            {k: v for k, v in self.manifest.plan.get("binding", {}).items() if k in binding}
        )
        rng = np.random.default_rng(0)
        feeds = {}
        for name in self.spec.inputs:
            spec = self.manifest.tensors[name]
            shape = tuple(eval_dim(d, binding) for d in spec.shape)
            dtype = np.dtype(spec.dtype)
            if spec.value is not None:  # a shape tensor: its value at this binding
                values = [eval_dim(v, binding) for v in spec.value]
                feeds[name] = np.array(values, dtype=dtype).reshape(shape)
            else:
                feeds[name] = (
                    np.zeros(shape) if dtype.kind in "iub" else rng.standard_normal(shape)
                ).astype(dtype)
        try:
            await asyncio.get_running_loop().run_in_executor(self._compute, self.runner.run, feeds)
            log.info("stage %d warmed up at %s", self.index, binding)
        except Exception as exc:
            # An input whose valid values lamc could not record (one computed from data): the
            # engine is loaded either way, and the first real request warms it.
            log.warning("stage %d warm-up skipped: %s", self.index, str(exc).splitlines()[0][:200])

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def drain(self, grace_s: float = 30.0) -> None:
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
        state, detail = self.ledger.states.get(request.request_id, ("unknown", ""))
        return wire.StatusReply(state=state, detail=detail, stage=self.index)

    async def reconfigure(self, request: Any, context: Any) -> Any:
        """Switch to stage `request.stage` of the failover plan for losing `request.lost`
        (empty: the primary plan), on this server's device. The new stage's session is
        built from the weights this process has mapped (only weights it did not hold are
        read from disk), between two requests; KV caches of the old stage are dropped."""
        if not token_matches(self.token, context.invocation_metadata()):
            self.counts["unauthenticated"] += 1
            return wire.ReconfigureReply(
                ok=False, code="UNAUTHENTICATED", message="missing or wrong token"
            )
        from lamc.errors import LamcError
        from lamc.manifest import verify_files
        from lamc.runtime.weights import mapped_files

        lost = tuple(str(d) for d in request.lost)
        index = int(request.stage)
        next_address = str(request.next_address) or None
        try:
            manifest = self.full_manifest.without(lost) if lost else self.full_manifest
            if not 0 <= index < len(manifest.stages):
                raise UsageError(f"that plan has stages 0..{len(manifest.stages) - 1}, not {index}")
            spec = manifest.stages[index]
            if spec.device != self.device:
                raise UsageError(
                    f"stage {index} of that plan runs on {spec.device}; this server is {self.device}"
                )
            last = index == len(manifest.stages) - 1
            if not last and next_address is None:
                raise UsageError(f"stage {index} of that plan needs the next stage's address")
        except LamcError as exc:
            return wire.ReconfigureReply(ok=False, code="INVALID_ARGUMENT", message=exc.message)
        started = time.perf_counter()
        held = {key[0]: int(m.size) for key, m in mapped_files().items()}

        def build() -> StageRunner:
            # Runs on the compute thread: between two requests, never during one.
            fresh = [f for f in spec.files if f.path not in self.verified]
            verify_files(self.out_dir, fresh)
            return load_stage(self.out_dir, spec, providers=self.providers, threads=self.threads)

        loop = asyncio.get_running_loop()
        try:
            runner = await loop.run_in_executor(self._compute, build)
        except LamcError as exc:
            return wire.ReconfigureReply(ok=False, code="FAILED_PRECONDITION", message=exc.message)
        except Exception as exc:
            return wire.ReconfigureReply(
                ok=False, code="INTERNAL", message=f"{type(exc).__name__}: {str(exc)[:300]}"
            )
        old_next = self._next
        self.manifest, self.spec, self.index, self.last = manifest, spec, index, last
        self.runner = runner
        self.caches = StageCaches(manifest, spec, capacity=self.max_sequences)
        self.verified |= {f.path for f in spec.files}
        self.lost = lost
        self.ledger.stage = index
        self.next_address = next_address
        self._next = None
        if next_address is not None and not last:
            self._next = Forwarder(
                index,
                next_address,
                tls=self.next_tls,
                token=self.token,
                max_message=self.max_message,
                codecs=self._codecs(index + 1),
                delay_ms=self.delay_ms,
            )
            self._next.connect()
        if old_next is not None:
            await old_next.close()
        now = {key[0]: int(m.size) for key, m in mapped_files().items()}
        mapped = sum(size for path, size in now.items() if path not in held)
        reused = sum(
            size
            for path, size in now.items()
            if path in held and any(path.endswith(r.file) for r in spec.weights)
        )
        load_ms = (time.perf_counter() - started) * 1000
        self.counts["reconfigured"] += 1
        log.info(
            "stage server of %s now serves stage %d of the plan without %s in %.0f ms "
            "(weights: %d bytes mapped anew, %d bytes reused)",
            self.device,
            index,
            ", ".join(lost) or "nothing (the primary plan)",
            load_ms,
            mapped,
            reused,
        )
        return wire.ReconfigureReply(
            ok=True,
            stage=index,
            load_ms=load_ms,
            mapped_bytes=mapped,
            reused_bytes=reused,
        )

    # --------------------------------------------------------------------------- work

    async def _worker(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            if time.monotonic() >= job.deadline:
                self.ledger.fail(job, f"deadline exceeded while queued at stage {self.index}")
                continue
            self.ledger.state(job.request_id, "running")
            try:
                _, sends = await loop.run_in_executor(
                    self._compute,
                    self.runner.hop,
                    self.manifest,
                    job.tensors,
                    job.binding,
                    self.caches,
                    job.step,
                )
            except CacheLost as exc:
                self.ledger.fail(job, str(exc))
                continue
            except Exception as exc:
                self.ledger.fail(
                    job,
                    f"stage {self.index} engine failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                )
                continue
            if self.last:
                self.ledger.result(job, sends)
            else:
                self._spawn(self._forward(job, sends))

    async def _forward(self, job: Job, tensors: dict[str, np.ndarray]) -> None:
        """Hand the request to the next stage; retry only while it has not accepted it."""
        assert self._next is not None
        self.ledger.state(job.request_id, "forwarding")
        problem = await self._next.send(job, tensors)
        if problem is None:
            self.ledger.forwarded(job, f"to stage {self.index + 1} at {self.next_address}")
        else:
            self.ledger.fail(job, problem)


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
        await service.drain()
    waiter.cancel()

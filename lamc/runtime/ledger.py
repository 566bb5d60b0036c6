"""A stage's ledger of requests: who gets each answer (the client's subscription, or a
pending box while it resubscribes), each request's last state, and the counts a stage
reports when it stops. One job: every accepted request is answered or failed, once."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lamc.runtime import wire
from lamc.runtime.kvcache import Step

_STATE_LIMIT = 10_000
_PENDING_LIMIT = 1_000
_RESIDENCE_WINDOW_S = 2.0
_TIMED_HOPS = 1024


@dataclass
class Job:
    request_id: str
    client_id: str
    deadline: float  # time.monotonic() on this host
    tensors: dict[str, np.ndarray]
    step: Step | None = None  # a decoder step: this stage's KV caches stay here
    attempt: int = 0
    accepted_at: float = field(default_factory=time.monotonic)
    binding: dict[str, int] = field(default_factory=dict)  # dims of the arriving tensors
    plan: int = 0  # the stage's plan generation when it accepted the request
    variants: tuple[str, ...] = ()  # "K:method": which build of each stage so far ran it

    def remaining_ms(self) -> float:
        return max((self.deadline - time.monotonic()) * 1000.0, 0.0)


class Ledger:
    def __init__(self, stage: int, where: str) -> None:
        self.stage = stage
        self.where = where
        self.subscribers: dict[str, asyncio.Queue[Any]] = {}
        self.pending: dict[str, collections.deque[tuple[float, Any]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=_PENDING_LIMIT)
        )
        self.states: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self.counts = collections.Counter[str]()
        # Accepted and not yet handed on (queued, running or forwarding), by request id.
        self._open: dict[str, Job] = {}
        # (when, seconds): how long each request handed on lately stayed at this stage.
        self._residence: collections.deque[tuple[float, float]] = collections.deque()
        # Milliseconds of the last hops: the engine's run, and the hand-off onward
        # (`lamc bench` against stage servers reads them through Status).
        self.compute_ms: collections.deque[float] = collections.deque(maxlen=_TIMED_HOPS)
        self.handoff_ms: collections.deque[float] = collections.deque(maxlen=_TIMED_HOPS)

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def open_jobs(self) -> list[Job]:
        return list(self._open.values())

    def accepted(self, job: Job) -> None:
        self._open[job.request_id] = job
        self.counts["accepted"] += 1
        self.state(job.request_id, "queued")

    def forwarded(self, job: Job, to: str) -> None:
        self.state(job.request_id, "forwarded", to)
        if self._open.pop(job.request_id, None) is not None:
            self._resided(job)
        self.counts["forwarded"] += 1

    def result(self, job: Job, tensors: dict[str, np.ndarray]) -> None:
        """The last stage's answer, to the client that sent the request."""
        if self._open.pop(job.request_id, None) is None:
            return  # already failed (the stage stopped before the answer was ready)
        self._resided(job)
        delivery = wire.Delivery(
            request_id=job.request_id,
            stage=self.stage,
            where=self.where,
            tensors=[wire.encode(n, v) for n, v in tensors.items()],
            variants=list(job.variants),
        )
        self._deliver(job, delivery)
        self.state(job.request_id, "delivered")
        self.counts["delivered"] += 1

    def _resided(self, job: Job) -> None:
        now = time.monotonic()
        self._residence.append((now, now - job.accepted_at))

    def residence_p95_ms(self) -> float:
        """The p95 of how long requests stay at this stage (queued, running, handing on)
        over the last two seconds, counting the age of those still here: the load signal
        a controller (`lamc control --slo-ms`) sums over the stages."""
        now = time.monotonic()
        while self._residence and self._residence[0][0] < now - _RESIDENCE_WINDOW_S:
            self._residence.popleft()
        samples = [s for _, s in self._residence]
        samples += [now - job.accepted_at for job in self._open.values()]
        if not samples:
            return 0.0
        return float(np.percentile(np.asarray(samples), 95)) * 1000

    def fail(self, job: Job, reason: str, replanned: bool = False) -> None:
        """A failure naming this stage, to the client that sent the request (once);
        `replanned`: the stage switched plans before running it (safe to send again)."""
        if self._open.pop(job.request_id, None) is None:
            return
        self._deliver(
            job,
            wire.Delivery(
                request_id=job.request_id,
                stage=self.stage,
                where=self.where,
                error=reason,
                retryable=True,
                replanned=replanned,
            ),
        )
        self.state(job.request_id, "failed", reason)
        self.counts["failed"] += 1

    def subscribe(self, client: str) -> asyncio.Queue[Any]:
        """The client's delivery queue, holding what waited for it while it was away."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.subscribers[client] = queue
        now = time.monotonic()
        for expires, delivery in self.pending.pop(client, ()):
            if expires > now:
                queue.put_nowait(delivery)
        return queue

    def unsubscribe(self, client: str, queue: asyncio.Queue[Any]) -> None:
        if self.subscribers.get(client) is queue:
            del self.subscribers[client]

    def undelivered(self) -> bool:
        return any(not q.empty() for q in self.subscribers.values())

    def _deliver(self, job: Job, delivery: Any) -> None:
        queue = self.subscribers.get(job.client_id)
        if queue is not None:
            queue.put_nowait(delivery)
        else:
            # The client is (re)subscribing: keep the delivery until the request's deadline.
            self.pending[job.client_id].append(
                (max(job.deadline, time.monotonic() + 5.0), delivery)
            )

    def state(self, request_id: str, state: str, detail: str = "") -> None:
        self.states[request_id] = (state, detail)
        self.states.move_to_end(request_id)
        while len(self.states) > _STATE_LIMIT:
            self.states.popitem(last=False)

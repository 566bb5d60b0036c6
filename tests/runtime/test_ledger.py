"""A stage's ledger reports its load: the p95 of how long requests stay at the stage."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lamc.runtime.ledger import Job, Ledger


def _job(request_id: str, age_s: float) -> Job:
    now = time.monotonic()
    return Job(request_id, "client", now + 60, {}, accepted_at=now - age_s)


def test_residence_counts_handed_on_and_open_requests() -> None:
    ledger = Ledger(0, "here")
    assert ledger.residence_p95_ms() == 0.0  # idle
    ages = [0.010 * k for k in range(1, 21)]
    for k, age in enumerate(ages):
        job = _job(f"r{k}", age)
        ledger.accepted(job)
        ledger.forwarded(job, "to stage 1")
    expected = float(np.percentile(np.asarray(ages), 95)) * 1000
    assert ledger.residence_p95_ms() == pytest.approx(expected, rel=0.02)
    # A request still queued counts with its age: one stuck for 5 s moves the p95 up.
    ledger.accepted(_job("stuck", 5.0))
    assert ledger.residence_p95_ms() > expected
    # A failed request is not a residence sample, and a repeated hand-off counts once.
    ledger.fail(ledger.open_jobs()[0], "lost")
    job = _job("again", 0.001)
    ledger.accepted(job)
    ledger.forwarded(job, "to stage 1")
    ledger.forwarded(job, "to stage 1")
    assert len(ledger._residence) == len(ages) + 1


def test_old_samples_leave_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(0, "here")
    job = _job("r", 0.5)
    ledger.accepted(job)
    ledger.forwarded(job, "to stage 1")
    assert ledger.residence_p95_ms() == pytest.approx(500, rel=0.02)
    later = time.monotonic() + 2.5
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert ledger.residence_p95_ms() == 0.0

"""`lamc bench`: latency percentiles and throughput, each stage measured beside the plan."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.cli.helpers import lamc
from tests.compiled import compile_zoo


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "out"
    compile_zoo("zoo:gpt2:test", out, 2)
    return out


def _ordered(stats: dict[str, float]) -> None:
    chain = [stats["min"], stats["p50"], stats["p90"], stats["p95"], stats["p99"], stats["max"]]
    assert all(a <= b for a, b in itertools.pairwise(chain)), stats
    assert stats["min"] <= stats["mean"] <= stats["max"] and stats["min"] > 0


def test_bench_in_process_times_every_stage_beside_its_prediction(compiled: Path) -> None:
    out = lamc("bench", str(compiled), "--iterations", "12", "--warmup", "1", "--json")
    assert out.code == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["requests"] == 12 and report["concurrency"] == 1
    _ordered(report["latency_ms"])
    assert report["throughput_rps"] == pytest.approx(12 / report["wall_s"])
    assert report["predicted"]["binding"] and report["predicted"]["latency_ms"] > 0
    stages = report["stages"]
    assert [s["stage"] for s in stages] == [0, 1]
    for stage in stages:
        _ordered(stage["measured_ms"])
        assert stage["predicted_compute_ms"] > 0
        ratio = stage["measured_ms"]["p50"] / stage["predicted_compute_ms"]
        assert stage["measured_over_predicted"] == pytest.approx(ratio)
    # The stages' hops are inside each request's time.
    assert sum(s["measured_ms"]["min"] for s in stages) <= report["latency_ms"]["max"]
    # A duration asks for more than the iterations.
    out = lamc("bench", str(compiled), "--iterations", "1", "--warmup", "0", "--duration", "0.4", "--json")  # fmt: skip
    report = json.loads(out.stdout)
    assert report["wall_s"] >= 0.4 and report["requests"] > 1
    # The terminal table names each stage, and the final line the percentiles.
    out = lamc("bench", str(compiled), "--iterations", "3", "--warmup", "0")
    assert out.code == 0 and "measured/predicted" in out.stdout
    assert out.final.startswith("PASSED bench") and "p99" in out.final


def test_bench_refuses_what_it_cannot_do(compiled: Path, tmp_path: Path) -> None:
    out = lamc("bench", str(compiled), "--concurrency", "4")
    assert out.code == 2 and "one request at a time" in out.final
    out = lamc("bench", str(compiled), "--random", "nosuchdim=3")
    assert out.code == 2 and "no dim nosuchdim" in out.final
    out = lamc("bench", str(tmp_path / "missing"))
    assert out.code == 9


def test_bench_against_stage_servers_keeps_requests_in_flight(compiled: Path) -> None:
    from tests.runtime.servers import StageServers

    with StageServers(compiled, 2) as servers:
        endpoints = [a for k, address in enumerate(servers.addresses) for a in ("--endpoint", f"{k}={address}")]  # fmt: skip
        out = lamc(
            "bench", str(compiled), *endpoints, "--iterations", "24", "--warmup", "2",
            "--concurrency", "4", "--json",
        )  # fmt: skip
    assert out.code == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["requests"] == 24 and report["concurrency"] == 4
    assert report["where"].startswith("stage servers")
    _ordered(report["latency_ms"])
    assert all("measured_ms" not in s for s in report["stages"])

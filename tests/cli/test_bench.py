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
    # Each server's own times for these requests: its engine, and the hand-off onward.
    stages = report["stages"]
    for stage in stages:
        _ordered(stage["measured_ms"])
        assert stage["measured_over_predicted"] == pytest.approx(
            stage["measured_ms"]["p50"] / stage["predicted_compute_ms"]
        )
        assert stage["measured_ms"]["min"] <= report["latency_ms"]["max"]
    _ordered(stages[0]["measured_handoff_ms"])  # stage 0 hands on to stage 1
    assert stages[0]["handoff_over_predicted"] > 0
    assert "measured_handoff_ms" not in stages[1]  # the last stage answers the client


def test_calibrate_writes_a_topology_that_predicts_what_was_measured(
    compiled: Path, tmp_path: Path
) -> None:
    from lamc.topology import load_topology
    from tests.compiled import MINIPCS
    from tests.conftest import analysed_model

    target = tmp_path / "calibrated.yaml"
    out = lamc(
        "bench", str(compiled), "--iterations", "10", "--warmup", "1", "--json",
        "--calibrate", str(MINIPCS), "--calibrated", str(target),
    )  # fmt: skip
    assert out.code == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    devices = report["calibration"]["devices"]
    stages = {s["device"]: s for s in report["stages"]}
    assert set(devices) == set(stages)  # one stage per device here
    for device, entry in devices.items():
        assert entry["ratio"] == pytest.approx(stages[device]["measured_over_predicted"])
    calibrated = load_topology(target)
    scales = {d.name: d.time_scale for d in calibrated.devices}
    for device, entry in devices.items():
        assert scales[device] == pytest.approx(entry["time_scale"], rel=1e-3)
    # Devices that ran no stage keep their rates.
    original = {d.name: d for d in load_topology(MINIPCS).devices}
    for name, scale in scales.items():
        if name not in devices:
            assert scale == 1.0 and calibrated.device(name).peak("fp32") == original[name].peak(
                "fp32"
            )
    # The same split costed on the calibrated topology predicts the measured times.
    from lamc.cost import CostModel
    from lamc.plan import parse_placement

    manifest = json.loads((compiled / "manifest.json").read_text())
    workload = analysed_model("zoo:gpt2:test").workload
    before, after = CostModel(workload, load_topology(MINIPCS)), CostModel(workload, calibrated)
    for place in parse_placement(manifest["plan"]["text"]):
        d = [x.name for x in calibrated.devices].index(place.device)
        old = before.compute_ms(d, place.start_unit, place.end_unit)
        assert old == pytest.approx(stages[place.device]["predicted_compute_ms"], rel=1e-4)
        new = after.compute_ms(d, place.start_unit, place.end_unit)
        assert new == pytest.approx(old * devices[place.device]["ratio"], rel=2e-3)


def test_calibrate_refuses_another_topology_and_stage_servers(
    compiled: Path, tmp_path: Path
) -> None:
    from tests.compiled import MINIPCS

    other = tmp_path / "other.yaml"
    other.write_text(MINIPCS.read_text() + "\n# edited\n")
    out = lamc("bench", str(compiled), "--iterations", "2", "--calibrate", str(other))
    assert out.code == 2 and "not the topology this pipeline was compiled for" in out.final
    assert not (tmp_path / "other.calibrated.yaml").exists()
    out = lamc("bench", str(compiled), "--calibrated", str(tmp_path / "x.yaml"))
    assert out.code == 2 and "give --calibrate" in out.final
    out = lamc("bench", str(compiled), "--endpoint", "0=127.0.0.1:1", "--calibrate", str(MINIPCS))
    assert out.code == 2 and "in this process" in out.final
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        MINIPCS.read_text().replace(
            "memory_bandwidth: 38.4GB/s}", "memory_bandwidth: 38.4GB/s, time_scale: -2}", 1
        )
    )
    out = lamc("plan", "zoo:gpt2:test", "-t", str(bad))
    assert out.code == 3 and "time_scale" in out.final

"""Failover plans made at compile time: the best plan without each device (or pair), under
the same constraints and budgets, recorded in the manifest and shown by `lamc plan`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lamc.compiler import plan_model
from lamc.compiler.failover import default_depth, failover_plans, lost_sets
from lamc.manifest import verify
from lamc.passes.partition.planner import PlanRequest
from lamc.plan import parse_placement
from lamc.topology import Constraints, load_topology
from tests.cli.helpers import lamc
from tests.compiled import MINIPCS, compile_zoo
from tests.conftest import analysed_model
from tests.synthetic import device_yaml

MODEL = "zoo:gpt2:test"


def _topology(tmp_path: Path, body: str, name: str = "t") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"lamc_topology: 1\nname: {name}\n{body}")
    return path


def test_each_failover_plan_is_the_best_plan_without_that_device() -> None:
    analysed = analysed_model(MODEL)
    topology = load_topology(MINIPCS)
    request = PlanRequest(constraints=Constraints(stages=3))
    primary, _ = plan_model(analysed, topology, request)
    used = {s.device for s in primary.stages}
    entries = failover_plans(analysed, topology, primary, request, 1)
    assert [e.lost for e in entries] == [(name,) for name in topology.names()]
    for entry in entries:
        assert entry.plan is not None, entry.reason
        devices = {p.device for p in parse_placement(entry.plan.text)}
        assert entry.lost[0] not in devices
        if entry.lost[0] not in used:
            assert entry.plan.text == primary.text  # losing an idle device changes nothing
            continue
        # Planned again from scratch over the topology without the device: the same plan.
        alone, _ = plan_model(analysed, topology.without(set(entry.lost)), PlanRequest())
        assert entry.plan.text == alone.text
        assert entry.plan.bottleneck_ms == pytest.approx(alone.bottleneck_ms)
        assert entry.plan.bottleneck_ms >= primary.bottleneck_ms * (1 - 1e-9)
        assert entry.plan.headroom is not None and 0 < entry.plan.headroom <= 1
        assert math.isfinite(entry.plan.latency_ms)


def test_pairs_and_the_default_depth(tmp_path: Path) -> None:
    topology = load_topology(MINIPCS)
    assert default_depth(topology) == 1
    pairs = lost_sets(topology, 2)
    assert len(pairs) == 4 + 6 and pairs[4] == ("n100-a", "n100-b")
    two = _topology(tmp_path, "devices:\n" + device_yaml("a") + device_yaml("b"))
    assert default_depth(load_topology(two)) == 0


def test_a_plan_that_cannot_fit_without_a_device_says_why(tmp_path: Path) -> None:
    analysed = analysed_model(MODEL)
    units = analysed.workload.units
    total = sum(u.param_bytes for u in units)
    # Each device holds a bit more than half the model: the pipeline needs both big ones.
    memory = f"{int(total * 0.6 + 2 * max(u.peak_activation_bytes for u in units))}B"
    path = _topology(
        tmp_path,
        "devices:\n"
        + device_yaml("big-a", memory=memory, host="box")
        + device_yaml("big-b", memory=memory, host="box")
        + device_yaml("tiny", memory="16B", host="box"),
    )
    topology = load_topology(path)
    primary, _ = plan_model(analysed, topology, PlanRequest())
    entries = {e.lost: e for e in failover_plans(analysed, topology, primary, None, 1)}
    for lost in [("big-a",), ("big-b",)]:
        assert entries[lost].plan is None
        assert "does not fit" in entries[lost].reason, entries[lost].reason
    assert entries[("tiny",)].plan is not None


def test_a_unit_pinned_to_the_lost_device_has_no_failover_plan() -> None:
    analysed = analysed_model(MODEL)
    topology = load_topology(MINIPCS)
    last = analysed.workload.units[-1].name
    request = PlanRequest(constraints=Constraints(pin={last: "n100-d"}))
    primary, _ = plan_model(analysed, topology, request)
    entries = {e.lost: e for e in failover_plans(analysed, topology, primary, request, 1)}
    assert entries[("n100-d",)].plan is None
    assert f"pin {last}=n100-d" in entries[("n100-d",)].reason
    assert entries[("n100-a",)].plan is not None


def test_a_lost_device_relays_nothing(tmp_path: Path) -> None:
    """a - b - c in a line: without b there is no route from a to c."""
    path = _topology(
        tmp_path,
        "devices:\n"
        + device_yaml("a")
        + device_yaml("b")
        + device_yaml("c")
        + "links:\n  - {a: a, b: b, bandwidth: 1GB/s, latency: 1ms}\n"
        "  - {a: b, b: c, bandwidth: 1GB/s, latency: 1ms}\n",
    )
    topology = load_topology(path)
    assert topology.routes("a", "c")
    assert not topology.without({"b"}).routes("a", "c")


def test_compile_records_failover_plans_in_the_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    compile_zoo(MODEL, out, 3)
    manifest = verify(out)
    assert [e.lost for e in manifest.failover] == [(n,) for n in load_topology(MINIPCS).names()]
    assert all(e.plan is not None and e.plan.text for e in manifest.failover)
    data = json.loads((out / "manifest.json").read_text())
    assert data["failover"][0]["plan"]["headroom"] > 0


def test_plan_failover_prints_a_table_and_json(tmp_path: Path) -> None:
    outcome = lamc("plan", MODEL, "-t", str(MINIPCS), "--stages", "2", "--failover")
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert "failover: the plan without each device" in outcome.stdout
    assert "(unchanged)" in outcome.stdout  # two of the four devices are idle
    outcome = lamc("plan", MODEL, "-t", str(MINIPCS), "--failover", "2", "--json")
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    data = json.loads(outcome.stdout[outcome.stdout.index("{") :].rsplit("}", 1)[0] + "}")
    assert len(data["failover"]) == 10
    outcome = lamc("plan", MODEL, "-t", str(MINIPCS), "--failover", "7")
    assert outcome.code == 2

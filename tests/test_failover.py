"""Failover plans made at compile time: the best plan without each device (or pair), under
the same constraints and budgets, recorded in the manifest and shown by `lamc plan`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lamc.compiler import plan_model
from lamc.compiler.failover import default_depth, failover_plans, lost_sets
from lamc.passes.partition.planner import PlanRequest
from lamc.plan import parse_placement
from lamc.topology import Constraints, load_topology
from lamc.verify import verify
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
    compile_zoo(MODEL, out, 3, failover=None)  # the default: on with 4 devices
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


@pytest.fixture(scope="module")
def gpt2_failover(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("failover") / "gpt2"
    compile_zoo(MODEL, out, 3, failover=None)
    return out


def test_failover_pipelines_are_built_with_the_weights_stored_once(
    gpt2_failover: Path, tmp_path: Path
) -> None:
    import numpy as np

    from lamc.runtime.executor import Pipeline

    manifest = verify(gpt2_failover)
    used = {s.device for s in manifest.stages}
    built = [e for e in manifest.failover if e.stages]
    assert {e.lost[0] for e in built} == used  # losing an idle device needs no new pipeline
    # Only stage graphs multiply: every weight file is the primary's, none is duplicated.
    weights = {p for p in manifest.files() if p.startswith("weights/")}
    primary_weights = {
        f.path for s in manifest.stages for f in s.files if f.path.startswith("weights/")
    }
    assert weights == primary_weights
    for entry in built:
        for stage in entry.stages:
            assert stage.device not in entry.lost
            assert [f.path for f in stage.files if not f.path.startswith("weights/")] == [
                stage.model
            ]
    # Each failover pipeline computes what the primary does.
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 500, size=(1, 9)).astype(np.int64)}
    want = Pipeline.open(gpt2_failover).run(feeds)["logits"]
    for entry in built:
        got = Pipeline.open(gpt2_failover, without=entry.lost).run(feeds)["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # An idle device's failover is the primary pipeline itself.
    idle = next(e.lost for e in manifest.failover if not e.stages)
    assert manifest.without(idle).stages == manifest.stages


def test_a_tampered_failover_stage_fails_verification(gpt2_failover: Path, tmp_path: Path) -> None:
    import shutil

    from lamc.errors import ExitCode, IntegrityError

    copy = tmp_path / "out"
    shutil.copytree(gpt2_failover, copy)
    target = copy / "failover" / "0" / "stage-1" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        verify(copy)
    assert info.value.exit_code == ExitCode.INTEGRITY
    assert "failover/0/stage-1/model.onnx: sha256" in info.value.message


def test_asking_for_a_failover_that_was_not_planned(gpt2_failover: Path) -> None:
    from lamc.errors import UsageError

    manifest = verify(gpt2_failover)
    with pytest.raises(UsageError, match="no failover plan was made for losing n100-a, n100-b"):
        manifest.without(("n100-a", "n100-b"))
    outcome = lamc("run", str(gpt2_failover), "--random", "--without", "nope")
    assert outcome.code == 2 and "no failover plan was made" in outcome.final


def test_a_decoder_generates_the_same_tokens_on_its_failover_plan(tmp_path: Path) -> None:
    from lamc.runtime.executor import Pipeline
    from lamc.runtime.generate import generate

    out = tmp_path / "dec"
    compile_zoo("zoo:gpt2:test,kv=1", out, 3, failover=1)
    manifest = verify(out)
    lost = next(e.lost for e in manifest.failover if e.stages)
    prompt = [[5, 17, 42, 7]]

    def tokens(pipeline: Pipeline) -> list[int]:
        return [int(t[0]) for t in generate(pipeline, prompt, 24)]

    assert tokens(Pipeline.open(out, without=lost)) == tokens(Pipeline.open(out))

"""Branch-parallel placement on real models and the example sensor topologies: the camera
and microphone towers of `zoo:fusion` and CLIP's two towers run on different devices at
the same time when that beats every chain, and the chain is kept when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamc.compiler import analyse, plan_model
from lamc.frontend import CaptureOptions
from lamc.passes.partition.branches import fork_join
from lamc.passes.partition.planner import PlanRequest
from lamc.topology import load_topology

ROOT = Path(__file__).resolve().parents[3]
HUB = ROOT / "examples/topologies/sensor-hub-wifi4.yaml"
EDGE = ROOT / "examples/topologies/camera-mic-edge.yaml"


@pytest.fixture(scope="module")
def fusion():  # type: ignore[no-untyped-def]
    return analyse("zoo:fusion", CaptureOptions(weights=False))


def _towers(plan, workload) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    """Tower name (the first part of a unit's name) -> the devices running its units."""
    found: dict[str, set[str]] = {}
    for stage in plan.stages:
        for u in stage.unit_set:
            found.setdefault(workload.units[u].name.split(".")[0].split("#")[0], set()).add(
                stage.device
            )
    return found


def test_the_fusion_model_has_two_branches_and_a_trunk(fusion) -> None:  # type: ignore[no-untyped-def]
    shape = fork_join(fusion.workload)
    assert shape is not None and len(shape.branches) == 2
    names = [{fusion.workload.units[u].name.split(".")[0] for u in b} for b in shape.branches]
    assert {"vision"} <= names[0] | names[1] and not names[0] & names[1]
    assert shape.trunk == (len(fusion.workload.units) - 1,)  # the fusion head


@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_on_slow_uplinks_the_towers_run_side_by_side(fusion, objective: str) -> None:  # type: ignore[no-untyped-def]
    topology = load_topology(HUB)
    best, _ = plan_model(fusion, topology, PlanRequest(objective=objective, compare=True))
    assert best.is_dag
    towers = _towers(best, fusion.workload)
    # The camera's tower on the camera, the other tower elsewhere, at the same time.
    assert towers["vision"] == {"camera"}
    assert "camera" not in towers["audio"]
    join = best.stages[best.join]  # type: ignore[index]
    assert join.after and all(best.stages[p].to == join.index for p in join.after)
    # The best chain is beside it under --compare, and it is worse.
    chain = next(a for a in best.alternatives if a.name == "chain")
    if objective == "throughput":
        assert (best.bottleneck_ms, best.latency_ms) < (chain.bottleneck_ms, chain.latency_ms)
    else:
        assert best.latency_ms < chain.latency_ms
    # --branches off gives that chain.
    off, _ = plan_model(fusion, topology, PlanRequest(objective=objective, branches="off"))
    assert not off.is_dag
    assert (off.bottleneck_ms, off.latency_ms) == pytest.approx(
        (chain.bottleneck_ms, chain.latency_ms)
    )


def test_when_a_chain_is_better_it_is_kept(fusion) -> None:  # type: ignore[no-untyped-def]
    """On fast Wi-Fi to a strong server, the throughput-optimal plan is a chain; the best
    branch-parallel plan is listed, and is worse."""
    best, _ = plan_model(fusion, load_topology(EDGE), PlanRequest(compare=True))
    assert not best.is_dag
    dag = next(a for a in best.alternatives if a.name == "dag")
    assert dag.bottleneck_ms > best.bottleneck_ms


def test_constraints_keep_the_plan_a_chain_and_say_so(fusion) -> None:  # type: ignore[no-untyped-def]
    from lamc.topology import Constraints

    request = PlanRequest(constraints=Constraints(exclude=("mic",)))
    best, _ = plan_model(fusion, load_topology(HUB), request)
    assert not best.is_dag
    assert any("not searched with constraints" in n for n in best.notes)


@pytest.mark.slow
def test_clip_towers_on_different_devices(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from locality import clip_checkpoint  # type: ignore[import-not-found]

    analysed = analyse(clip_checkpoint(tmp_path / "clip"))
    best, _ = plan_model(analysed, load_topology(HUB), PlanRequest(compare=True))
    assert best.is_dag
    towers: dict[str, set[str]] = {}
    for stage in best.stages:
        for u in stage.unit_set:
            name = analysed.workload.units[u].name
            tower = "vision" if "vision" in name else "text" if "text" in name else "other"
            towers.setdefault(tower, set()).add(stage.device)
    assert towers["vision"] == {"camera"} and "camera" not in towers["text"]
    chain = next(a for a in best.alternatives if a.name == "chain")
    assert best.latency_ms < chain.latency_ms

"""`lamc diff A B`: two plans or two compiled pipelines, each difference named, exit 0 when
they are the same and 1 when they differ; anything else is exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.helpers import lamc
from tests.compiled import compile_zoo

ROOT = Path(__file__).resolve().parent.parent.parent
TOPOLOGIES = ROOT / "examples" / "topologies"
MODEL = "zoo:gpt2:test"


def _plan(tmp_path: Path, topology: str) -> Path:
    outcome = lamc("plan", MODEL, "-t", str(TOPOLOGIES / topology), "--json")
    assert outcome.code == 0, outcome.final
    path = tmp_path / f"{topology}.json"
    path.write_text(outcome.stdout)
    return path


def test_two_plans_of_one_model_over_two_topologies(tmp_path: Path) -> None:
    a = _plan(tmp_path, "4x-minipc-1gbe.yaml")
    b = _plan(tmp_path, "jetson-pi-laptop.yaml")
    same = lamc("diff", str(a), str(a))
    assert same.code == 0 and "are the same plan" in same.final, same.final
    differ = lamc("diff", str(a), str(b))
    assert differ.code == 1, differ.final
    lines = [x for x in differ.stdout.splitlines() if not x.startswith(("FAILED", "PASSED"))]
    assert "topology: 4x-minipc-1gbe -> jetson-pi-laptop" in lines
    assert any(x.startswith("stages/0/device: n100-a -> ") for x in lines), lines
    assert any(x.startswith("throughput_rps: ") for x in lines)
    outcome = lamc("diff", str(a), str(b), "--json")
    assert outcome.code == 1
    report = json.loads(outcome.stdout)
    assert report["kind"] == "plan" and report["equal"] is False
    paths = {d["path"]: d for d in report["differences"]}
    assert paths["topology"]["a"] == "4x-minipc-1gbe"
    assert len(report["differences"]) == len(lines)
    # A tolerance on numbers leaves the structural differences.
    loose = json.loads(lamc("diff", str(a), str(b), "--json", "--rtol", "10").stdout)
    assert "throughput_rps" not in {d["path"] for d in loose["differences"]}
    assert "topology" in {d["path"] for d in loose["differences"]}


def test_two_compiled_pipelines(tmp_path: Path) -> None:
    two, three = tmp_path / "two", tmp_path / "three"
    compile_zoo(MODEL, two, 2)
    compile_zoo(MODEL, three, 3)
    assert lamc("diff", str(two), str(two / "manifest.json")).code == 0
    outcome = lamc("diff", str(two), str(three), "--json")
    assert outcome.code == 1
    paths = [d["path"] for d in json.loads(outcome.stdout)["differences"]]
    assert "stages/2" in paths  # the third stage, named once
    assert any(p.startswith("stages/1/files/") for p in paths)  # a stage graph's hash


def test_what_cannot_be_compared_is_exit_2(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "4x-minipc-1gbe.yaml")
    out = tmp_path / "out"
    compile_zoo(MODEL, out, 2)
    mixed = lamc("diff", str(plan), str(out))
    assert mixed.code == 2 and "compare like with like" in mixed.final
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    outcome = lamc("diff", str(junk), str(plan))
    assert outcome.code == 2 and "neither a plan" in outcome.final
    outcome = lamc("diff", str(tmp_path / "missing"), str(plan))
    assert outcome.code == 2 and "no such plan file" in outcome.final

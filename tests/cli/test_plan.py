"""`lamc plan` and `lamc profile` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.helpers import lamc

ROOT = Path(__file__).parent.parent.parent
TOPOLOGIES = ROOT / "examples" / "topologies"
USER = ROOT / "tests" / "data" / "user_models.py"


def test_plan_gpt2_on_an_example_topology(tmp_path: Path) -> None:
    out = lamc(
        "plan",
        "zoo:gpt2:test",
        "-t",
        str(TOPOLOGIES / "jetson-pi-laptop.yaml"),
        "--compare",
        "--explain",
        "--plot",
        str(tmp_path / "plan.png"),
    )
    assert out.code == 0, out.stdout + out.stderr
    assert (
        "predicted:" in out.stdout
        and "compared with" in out.stdout
        and "how each number was computed" in out.stdout
    )
    assert out.final.startswith("PASSED plan zoo:gpt2:test on jetson-pi-laptop")
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_json_is_byte_identical() -> None:
    args = [
        "plan",
        f"{USER}:spec_factory",
        "-t",
        str(TOPOLOGIES / "4x-minipc-1gbe.yaml"),
        "--json",
        "--compare",
    ]
    first, second = lamc(*args), lamc(*args)
    assert first.code == second.code == 0
    assert first.stdout == second.stdout
    data = json.loads(first.stdout)
    assert data["objective"] == "throughput" and data["stages"] and data["fluid_bound_ms"] > 0


def test_bad_topology_exits_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "devices:\n  - {name: a, kind: cpu, memory: 0GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 1GB/s}\n"
    )
    out = lamc("plan", f"{USER}:spec_factory", "-t", str(bad))
    assert out.code == 3
    assert f"{bad}:2: devices[0].memory: must be greater than zero" in out.final


def test_does_not_fit_exits_6(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        "devices:\n  - {name: a, kind: cpu, memory: 1MiB, runtime_memory: 0B, peak: {fp32: 1TFLOPS}, memory_bandwidth: 1GB/s}\n"
    )
    out = lamc("plan", "zoo:gpt2:test", "-t", str(tiny), "--no-weights")
    assert out.code == 6
    assert "does not fit" in out.final and "a has 1.00 MiB free" in out.final
    assert "hint: compress" in out.stdout


def test_budget_gate_exits_6() -> None:
    args = ["plan", f"{USER}:spec_factory", "-t", str(TOPOLOGIES / "4x-minipc-1gbe.yaml")]
    out = lamc(*args, "--max-latency-ms", "0.000001")
    assert out.code == 6 and "budget not met: max_latency_ms" in out.final
    ok = lamc(*args, "--max-latency-ms", "1000", "--min-memory-headroom", "10%")
    assert ok.code == 0 and "budget max_latency_ms" in ok.stdout


def test_constraints_from_the_command_line() -> None:
    out = lamc(
        "plan",
        "zoo:gpt2:test",
        "-t",
        str(TOPOLOGIES / "4x-minipc-1gbe.yaml"),
        "--stages",
        "3",
        "--pin",
        "transformer.ln_f*=n100-d",
        "--json",
    )
    assert out.code == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert len(data["stages"]) == 3 and data["stages"][-1]["device"] == "n100-d"
    conflict = lamc(
        "plan",
        "zoo:gpt2:test",
        "-t",
        str(TOPOLOGIES / "4x-minipc-1gbe.yaml"),
        "--stages",
        "1",
        "--pin",
        "#0=n100-a",
        "--pin",
        "#5=n100-b",
    )
    assert conflict.code == 6 and "stages=1" in conflict.final and "pin #0=n100-a" in conflict.final


@pytest.mark.slow
def test_profile_writes_an_includable_device(tmp_path: Path) -> None:
    device = tmp_path / "here.yaml"
    out = lamc("profile", "-o", str(device), "--name", "here", "--host", "localhost")
    assert out.code == 0, out.stdout + out.stderr
    (tmp_path / "topology.yaml").write_text("devices:\n  - include: here.yaml\n")
    plan = lamc("plan", f"{USER}:spec_factory", "-t", str(tmp_path / "topology.yaml"), "--json")
    assert plan.code == 0, plan.stdout + plan.stderr
    assert json.loads(plan.stdout)["stages"][0]["device"] == "here"


def test_ci_gate_script(tmp_path: Path) -> None:
    """The example CI gate passes within budget and fails (exit 6) outside it."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", CI="true")
    script = ROOT / "examples" / "ci" / "plan-gate.sh"
    args = [str(script), f"{USER}:spec_factory", str(TOPOLOGIES / "4x-minipc-1gbe.yaml")]
    ok = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "plan.json").read_text())["budgets"]
    broken = subprocess.run(
        args,
        cwd=tmp_path,
        env={**env, "MAX_LATENCY_MS": "0.0000001"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert broken.returncode == 6
    assert "budget not met" in broken.stderr

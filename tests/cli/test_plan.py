"""`lamc plan` and `lamc profile` from the command line."""

from __future__ import annotations

import itertools
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
    # Each baseline says where it cuts: contiguous unit ranges over the whole model.
    units = data["stages"][-1]["end_unit"]
    assert {a["name"] for a in data["alternatives"]} >= {"equal", "memory", "single"}
    for baseline in data["alternatives"]:
        ranges = baseline["unit_ranges"]
        assert ranges[0][0] == 0 and ranges[-1][1] == units, baseline
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), baseline
        assert len(ranges) == len(baseline["devices"])


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
    # The per-message cost between stages was measured (a loopback gRPC call) and loads.
    from lamc.topology import load_topology

    here = load_topology(tmp_path / "topology.yaml").devices[0]
    assert "serialize:" in device.read_text()
    assert here.serialize_bandwidth > 0 and here.serialize_ms(2**20) > here.serialize_ms(0) >= 0


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


def _quantised_mlp(path: Path) -> Path:
    """An ONNX MLP whose fourth layer is integer-quantised in standard ONNX ops
    (DynamicQuantizeLinear + MatMulInteger), which ONNX Runtime runs and TensorRT's parser
    does not."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    width, nodes, inits = 512, [], []
    x = "x"
    for k in range(8):
        w = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{k}")
        if k == 3:
            q = numpy_helper.from_array(
                rng.integers(-127, 127, (width, width)).astype(np.int8), f"qw{k}"
            )
            inits.append(q)
            nodes += [
                helper.make_node(
                    "DynamicQuantizeLinear", [x], [f"xq{k}", f"xs{k}", f"xz{k}"], name=f"dq{k}"
                ),
                helper.make_node(
                    "MatMulInteger", [f"xq{k}", f"qw{k}", f"xz{k}"], [f"mi{k}"], name=f"mmi{k}"
                ),
                helper.make_node(
                    "Cast", [f"mi{k}"], [f"mf{k}"], to=TensorProto.FLOAT, name=f"cast{k}"
                ),
                helper.make_node("Mul", [f"mf{k}", f"xs{k}"], [f"h{k}"], name=f"scale{k}"),
            ]
        else:
            inits.append(w)
            nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"], name=f"mm{k}"))
            nodes.append(helper.make_node("Relu", [f"m{k}"], [f"h{k}"], name=f"relu{k}"))
        x = f"h{k}"
    graph = helper.make_graph(
        nodes,
        "qmlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [512, width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_an_op_a_backend_cannot_run_moves_its_stage_and_explain_says_why(tmp_path: Path) -> None:
    model = _quantised_mlp(tmp_path / "qmlp.onnx")
    topology = tmp_path / "trt.yaml"
    topology.write_text(
        "lamc_topology: 1\nname: trt-and-cpu\ndevices:\n"
        "  - {name: orin, host: orin, kind: gpu, memory: 8GiB, peak: {fp32: 5TFLOPS}, memory_bandwidth: 100GB/s, backends: [tensorrt]}\n"
        "  - {name: pc, host: pc, kind: cpu, memory: 8GiB, peak: {fp32: 200GFLOPS}, memory_bandwidth: 20GB/s, backends: [onnxruntime]}\n"
        "links:\n  - {a: orin, b: pc, bandwidth: 10Gbit/s, latency: 0.5ms}\n"
    )
    out = lamc(
        "plan", str(model), "-t", str(topology), "--explain", "--objective", "latency", "--json"
    )
    assert out.code == 0, out.stdout + out.stderr
    data = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    refused = [line.split(" kept off ")[0] for line in data["support"]]
    holders = [s for s in data["stages"] if set(refused) & set(s["units"])]
    assert refused and holders and all(s["device"] == "pc" for s in holders)
    assert any(s["device"] == "orin" for s in data["stages"])  # the rest stays on the GPU
    assert data["support"] and all("kept off orin" in line for line in data["support"])
    assert any(
        "MatMulInteger" in line or "DynamicQuantizeLinear" in line for line in data["support"]
    )
    text = lamc("plan", str(model), "-t", str(topology), "--explain", "--objective", "latency")
    assert text.code == 0, text.stdout + text.stderr
    assert "backend:" in text.stdout and "TensorRT's ONNX parser has no" in text.stdout

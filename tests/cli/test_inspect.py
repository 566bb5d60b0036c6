"""`lamc inspect`: the table, JSON, exit codes and one-line reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.cli.helpers import lamc

USER = Path(__file__).parent.parent / "data" / "user_models.py"


def test_inspect_table() -> None:
    out = lamc("inspect", f"{USER}:spec_factory")
    assert out.code == 0, out.stdout + out.stderr
    assert "total" in out.stdout and "capture" in out.stdout
    assert out.final.startswith("PASSED inspect")


def test_inspect_json_is_all_of_stdout() -> None:
    out = lamc("inspect", f"{USER}:spec_factory", "--json", "--dims", "batch=4")
    assert out.code == 0
    data = json.loads(out.stdout)
    assert data["binding"] == {"batch": 4}
    assert data["totals"]["matrix_flops"] == 2 * 4 * (8 * 16 + 16 * 4)
    assert data["capture_s"] > 0
    assert out.stderr.strip().splitlines()[-1].startswith("PASSED")


def test_exit_codes_and_one_line_reasons(tmp_path: Path) -> None:
    cases = [
        (["inspect", "no/such/model.onnx"], 2, "does not exist"),
        (["inspect", "zoo:nope"], 2, "unknown zoo model"),
        (["inspect", f"{USER}:raising_factory"], 4, "checkpoint shard 3 is missing"),
        (["inspect", f"{USER}:data_dependent_factory"], 4, "data-dependent"),
        (["inspect", f"{USER}:spec_factory", "--dynamic", "batch=9:1"], 2, "MIN <= MAX"),
        (["inspect", "--bogus"], 2, "No such option"),
    ]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04lamc" + b"\xff" * 20)
    cases.append((["inspect", str(bad)], 4, "not a valid ONNX model"))
    for args, code, needle in cases:
        out = lamc(*args)
        assert out.code == code, (args, out.stdout, out.stderr)
        assert out.final.startswith("FAILED") and needle in out.final, (args, out.final)


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed `lamc` entry point, as a user runs it (with CI set: no progress output)."""
    script = Path(sys.executable).parent / "lamc"
    env = dict(os.environ, CI="true")
    done = subprocess.run(
        [str(script), "inspect", f"{USER}:spec_factory"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("PASSED inspect")
    assert "Traceback" not in done.stderr


def _data_dependent_model(path: Path) -> None:
    """x -> NonZero -> Cast -> Transpose -> MatMul: the count of non-zeros sizes every
    value after the first node, so no shape there can be known before it runs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="find"),
        helper.make_node("Cast", ["nz"], ["f"], to=1, name="to_float"),
        helper.make_node("Transpose", ["f"], ["t"], name="flip"),
        helper.make_node("MatMul", ["t", "w"], ["y"], name="project"),
    ]
    graph = helper.make_graph(
        nodes,
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.ones((1, 4), dtype=np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_nodes_whose_cost_is_unknown_are_named_and_strict_refuses_them(tmp_path: Path) -> None:
    path = tmp_path / "nonzero.onnx"
    _data_dependent_model(path)
    out = lamc("inspect", str(path), "--dims", "n=5")
    assert out.code == 0, out.stdout + out.stderr
    assert "could not resolve" in out.stderr
    for name in ("to_float", "flip", "project"):
        assert name in out.stderr
    for command in (["inspect"], ["compile", "-o", str(tmp_path / "out"), "-t", str(USER.parent.parent.parent / "examples" / "topologies" / "4x-minipc-1gbe.yaml")]):  # fmt: skip
        out = lamc(*command, str(path), "--dims", "n=5", "--strict")
        assert out.code == 4, out.stdout + out.stderr
        assert "could not resolve" in out.final and "project" in out.final
    assert not (tmp_path / "out").exists()

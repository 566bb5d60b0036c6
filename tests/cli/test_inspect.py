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

"""compile, run, validate and inspect from the command line, with their exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.cli.helpers import lamc
from tests.compiled import MINIPCS

USER = Path(__file__).parent.parent / "data" / "user_models.py"


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("cli") / "out"
    result = lamc(
        "compile",
        f"{USER}:spec_factory",
        "-t",
        str(MINIPCS),
        "-o",
        str(target),
        "--stages",
        "2",
        "--report",
        str(target.parent / "report.json"),
    )
    assert result.code == 0, result.stdout + result.stderr
    assert result.final.startswith(f"PASSED compile {USER}:spec_factory -> {target}: 2 stage(s)")
    return target


def test_report(out: Path) -> None:
    report = json.loads((out.parent / "report.json").read_text())
    assert set(report["seconds"]) >= {
        "capture and analyse",
        "partition",
        "slice",
        "build",
        "manifest",
    }
    checker = [c for c in report["checks"] if "onnx.checker" in c]
    assert len(checker) == 2  # one per stage of the primary plan
    # With 3+ devices, the failover pipelines are built (and load-checked) too.
    assert any(c.startswith("failover: ") for c in report["checks"]), report["checks"]
    assert len(report["plan"]["stages"]) == 2


def test_run_with_npy_inputs_and_outputs(out: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = lamc(
        "run",
        str(out),
        "--input",
        f"x={tmp_path / 'x.npy'}",
        "--output",
        str(tmp_path / "y"),
        "--json",
    )
    assert result.code == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["stages"] == 2
    (y,) = list((tmp_path / "y").glob("*.npy"))
    assert np.load(y).shape == (3, 4)


def test_run_exit_codes(out: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((3, 9), np.float32))
    wrong = lamc("run", str(out), "--input", f"x={tmp_path / 'bad.npy'}")
    assert wrong.code == 2 and "expected size 8 on axis 1" in wrong.final
    assert lamc("run", str(out)).code == 2  # no inputs
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = broken / "stage-1" / "model.onnx"
    data.write_bytes(data.read_bytes()[:-1])
    tampered = lamc("run", str(broken), "--random")
    assert tampered.code == 9 and "stage-1/model.onnx: size" in tampered.final
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "stage-1" / "model.onnx").write_bytes((out / "stage-1" / "model.onnx").read_bytes())
    for stage in manifest["stages"]:
        stage["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    missing = lamc("run", str(broken), "--random")
    assert missing.code == 10 and "CUDAExecutionProvider" in missing.final
    assert lamc("run", str(broken), "--random", "--providers", "cpu").code == 0


def test_validate(out: Path) -> None:
    ok = lamc("validate", str(out), "--json")
    assert ok.code == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert (
        report["ok"]
        and len(report["rows"]) == 4
        and all(r["max_abs"] < 1e-5 for r in report["rows"])
    )
    # Against a different model (other weights), validation fails with exit 7.
    bad = lamc("validate", str(out), "--model", "tests.data.user_models:other_weights_factory")
    assert bad.code == 7 and "differs by" in bad.final


def test_inspect_compiled(out: Path) -> None:
    table = lamc("inspect", str(out))
    assert (
        table.code == 0
        and "stages" in table.stdout
        and "tensors at the stage boundaries" in table.stdout
    )
    data = json.loads(lamc("inspect", str(out), "--json").stdout)
    assert data["lamc_manifest"] == 2 and len(data["stages"]) == 2


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    result = lamc(
        "compile",
        f"{USER}:spec_factory",
        "-t",
        str(MINIPCS),
        "-o",
        str(tmp_path / "never"),
        "--dry-run",
    )
    assert result.code == 0 and "(dry run)" in result.final
    assert not (tmp_path / "never").exists()

"""The wheel installs passes/, backends/ and models/ as lamc.passes, lamc.backends, lamc.models."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = out.glob("lamc-*.whl")
    return found


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (
        "lamc/passes/analyze.py",
        "lamc/passes/partition/__init__.py",
        "lamc/backends/__init__.py",
        "lamc/models/gpt2.py",
        "lamc/py.typed",
        "lamc/cli/main.py",
        "lamc/protos/grpc_predict_v2.proto",
        "lamc/protos/grpc_predict_v2.binpb",
    ):
        assert path in names, path
    assert not any(n.startswith(("passes/", "backends/", "models/", "tests/")) for n in names)


def test_wheel_imports(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        # Drop the editable install's finder so that only the wheel's files can answer.
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')];"
        "import lamc, lamc.passes.analyze, lamc.backends, lamc.models.gpt2, lamc.runtime.kserve;"
        "print(lamc.passes.analyze.__file__); print(lamc.models.gpt2.__file__);"
        "print(lamc.runtime.kserve.DESCRIPTOR_SET)"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for line in done.stdout.split():
        assert line.startswith(str(target)), line

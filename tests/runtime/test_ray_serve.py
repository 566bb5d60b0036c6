"""`lamc serve OUT --ray ADDRESS`: the stages as Ray Serve deployments on a local Ray head
(loopback, token authentication on), checked against the in-process pipeline."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.compiled import compile_zoo
from tests.runtime.servers import free_port

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason="Ray Serve needs the lamc[ray] extra")


def _lamc(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lamc", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    binary = shutil.which("ray", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("the `ray` command is not installed next to this Python")
    port = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = [
        binary, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "8", "--include-dashboard", "false", "--disable-usage-stats",
    ]  # fmt: skip
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.fail(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([binary, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_refuses_without_token_authentication(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    result = _lamc("serve", str(tmp_path), "--ray", "127.0.0.1:1", env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "RAY_AUTH_MODE=token" in result.stdout + result.stderr


def test_ray_serve_pipeline_matches_in_process(
    ray_head: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = ray_head
    out = tmp_path / "gpt2"
    compile_zoo("zoo:gpt2:test", out, 3)
    deployed = _lamc("serve", str(out), "--ray", address, env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "deployed 3 stage(s)" in deployed.stdout + deployed.stderr
    ran = _lamc(
        "run", str(out), "--ray", address, "--random", "--seed", "3", "--output", str(tmp_path / "r"),
        env=env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    local = _lamc(
        "run", str(out), "--random", "--seed", "3", "--output", str(tmp_path / "l"), env=env
    )
    assert local.returncode == 0, local.stdout + local.stderr
    got = np.load(tmp_path / "r" / "logits.npy")
    want = np.load(tmp_path / "l" / "logits.npy")
    assert got.shape == want.shape and np.array_equal(got, want)

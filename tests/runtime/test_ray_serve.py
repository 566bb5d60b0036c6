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
    http = f"127.0.0.1:{free_port()}"
    token = "rest-token"
    deployed = _lamc(
        "serve", str(out), "--ray", address, "--http", http, env={**env, "LAMC_TOKEN": token}
    )
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

    # The HTTP ingress speaks KServe v2 REST with the model's own names.
    base = f"http://{http}/v2"
    assert _http("GET", f"{base}/health/ready") == (200, {"ready": True})
    ids = np.random.default_rng(5).integers(0, 500, size=(2, 6)).astype(np.int64)
    body = {
        "id": "rest-1",
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [2, 6], "data": ids.ravel().tolist()}],
    }  # fmt: skip
    auth = {"Authorization": f"Bearer {token}"}
    assert _http("POST", f"{base}/models/gpt2-test/infer", body)[0] == 401
    status, answer = _http("POST", f"{base}/models/gpt2-test/infer", body, auth)
    assert status == 200, answer
    assert answer["id"] == "rest-1" and answer["outputs"][0]["name"] == "logits"
    rest = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(
        answer["outputs"][0]["shape"]
    )
    from lamc.runtime.executor import Pipeline

    want_rest = Pipeline.open(out).run({"input_ids": ids})["logits"]
    assert rest.shape == want_rest.shape and np.array_equal(rest, want_rest)
    status, metadata = _http("GET", f"{base}/models/gpt2-test", None, auth)
    assert status == 200 and metadata["inputs"] == [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
    ]
    status, refused = _http(
        "POST", f"{base}/models/gpt2-test/infer",
        {"inputs": [{"name": "input_ids", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]},
        auth,
    )  # fmt: skip
    assert status == 400 and "expected dtype int64" in refused["error"], refused
    assert _http("GET", f"{base}/models/other", None, auth)[0] == 404

    # A plain handle call with a dict of arrays answers a dict of the model's outputs.
    script = (
        "import ray, numpy as np, sys; from ray import serve;"
        f"ray.init(address='{address}', log_to_driver=False);"
        "h = serve.get_app_handle('lamc-gpt2-test');"
        "ids = np.arange(12, dtype=np.int64).reshape(2, 6);"
        "out = h.remote({'input_ids': ids}).result(timeout_s=60);"
        f"np.save('{tmp_path / 'handle.npy'}', out['logits'])"
    )
    called = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert called.returncode == 0, called.stderr[-3000:]
    handled = np.load(tmp_path / "handle.npy")
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    assert np.array_equal(handled, Pipeline.open(out).run({"input_ids": ids})["logits"])


def _http(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_build_app_for_serve_run(tmp_path: Path) -> None:
    """`serve run lamc.runtime.ray_serve:build_app out=OUT` builds the application (no
    cluster needed to build it); without out= it names what is missing."""
    from ray.serve import Application

    from lamc.errors import UsageError
    from lamc.runtime.ray_serve import build_app

    out = tmp_path / "gpt2"
    compile_zoo("zoo:gpt2:test", out, 2)
    assert isinstance(build_app({"out": str(out), "token": "t"}), Application)
    with pytest.raises(UsageError, match="give out=OUT"):
        build_app({})


def test_a_replicated_stage_spreads_requests_by_speed(
    ray_head: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """`--replicate`: the middle stage runs on two PCs (one deployment each); stage 0 hands
    each request to one of them round-robin by the plan's shares, and every answer equals
    the in-process pipeline's."""
    import json

    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.runtime.executor import Pipeline
    from tests.conftest import analysed_model

    address, env = ray_head
    out = tmp_path / "replicated"
    topology = Path(__file__).parent.parent / "data" / "two-boards-two-pcs.yaml"
    compile_model(
        "zoo:gpt2:test",
        topology,
        out,
        CompileOptions(request=PlanRequest(replicate="auto")),
        analysed=analysed_model("zoo:gpt2:test"),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    replicated = [s for s in manifest["stages"] if s.get("replicas")]
    assert [s["index"] for s in replicated] == [1], manifest["plan"]["text"]
    shares = {r["device"]: r["share"] for r in replicated[0]["replicas"]}
    assert set(shares) == {"pc-a", "pc-b"} and shares["pc-a"] > shares["pc-b"]

    deployed = _lamc("serve", str(out), "--ray", address, env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "deployed 3 stage(s)" in deployed.stdout and "1 more replica(s)" in deployed.stdout

    n = 40
    script = (
        "import json, sys, numpy as np, ray; from ray import serve\n"
        "from lamc.runtime.ray_serve import RayPipeline, app_name\n"
        f"out = {str(out)!r}\n"
        f"client = RayPipeline(out, {address!r}, timeout_s=60)\n"
        "rng = np.random.default_rng(11)\n"
        f"for k in range({n}):\n"
        "    ids = rng.integers(0, 500, size=(1, 7)).astype(np.int64)\n"
        f"    np.save({str(tmp_path)!r} + f'/ids{{k}}.npy', ids)\n"
        f"    np.save({str(tmp_path)!r} + f'/out{{k}}.npy', client.run({{'input_ids': ids}})['logits'])\n"
        "calls = {}\n"
        "for name in ('stage1', 'stage1-r1'):\n"
        "    h = serve.get_deployment_handle(name, app_name=client.app)\n"
        "    got = h.served.remote().result(timeout_s=60)\n"
        "    calls[got['device']] = got['calls']\n"
        "print(json.dumps(calls))\n"
    )
    called = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert called.returncode == 0, called.stderr[-3000:]
    calls = json.loads(called.stdout.strip().splitlines()[-1])
    # Smooth weighted round-robin: each member within one request of its share.
    assert sum(calls.values()) == n, calls
    for device, share in shares.items():
        assert abs(calls[device] - n * share) <= 1.0, (calls, shares)
    pipeline = Pipeline.open(out)
    for k in range(n):
        want = pipeline.run({"input_ids": np.load(tmp_path / f"ids{k}.npy")})["logits"]
        assert np.array_equal(np.load(tmp_path / f"out{k}.npy"), want)

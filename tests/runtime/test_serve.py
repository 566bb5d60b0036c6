"""Stage microservices: `lamc serve` processes chained over gRPC, driven by RemotePipeline.

Every fault test keeps the books: each request stage 0 accepted ends in a result or an
error (accepted == succeeded + failed), and errors name the stage and its address.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from lamc.runtime.executor import Pipeline
from lamc.runtime.hosts import Endpoints
from lamc.runtime.remote import Rejected, RemotePipeline, StageFailure
from tests.compiled import compile_zoo
from tests.runtime.servers import StageServers

MODEL = "zoo:gpt2:test"


@pytest.fixture(scope="module")
def gpt2_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "gpt2"
    compile_zoo(MODEL, out, 3)
    return out


def _feeds(n: int, seed: int = 0, seq: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 500, size=(1, seq)).astype(np.int64)} for _ in range(n)]


def _balanced(client: RemotePipeline) -> None:
    counts = client.counts
    assert counts["accepted"] == counts["succeeded"] + counts["failed"], dict(counts)


def test_three_processes_match_one_process_bit_for_bit(gpt2_3: Path, tmp_path: Path) -> None:
    feeds = _feeds(10)
    local = Pipeline.open(gpt2_3)
    want = [local.run(f) for f in feeds]
    with (
        StageServers(gpt2_3, 3, log_dir=tmp_path) as servers,
        RemotePipeline(gpt2_3, Endpoints(dict(enumerate(servers.addresses)))) as client,
    ):
        got = client.run_many(feeds, in_flight=8)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert isinstance(g, dict), g
            for name in w:
                assert g[name].dtype == w[name].dtype
                assert np.array_equal(g[name], w[name]), f"request {i} {name} differs"
        _balanced(client)
        assert client.counts["succeeded"] == len(feeds)
        # SIGTERM drains and exits cleanly.
        assert [servers.terminate(k) for k in range(3)] == [0, 0, 0]
    # The later stages receive Reshape targets (shape tensors) across the cut; each warmed
    # up with the value the manifest records for them, not a made-up one.
    manifest = json.loads((gpt2_3 / "manifest.json").read_text())
    shape_inputs = [
        name
        for name in manifest["stages"][1]["inputs"]
        if "int" in manifest["tensors"][name]["dtype"]
    ]
    assert shape_inputs and all("value" in manifest["tensors"][n] for n in shape_inputs)
    for k in range(3):
        log = (tmp_path / f"stage{k}.log").read_text()
        assert f"stage {k} warmed up" in log and "warm-up skipped" not in log, log[-2000:]


def test_kill_mid_request_fails_fast_naming_stage_and_host(gpt2_3: Path) -> None:
    # Stage 1 holds each request for 3 s before handing it on: it is killed with them inside.
    with StageServers(gpt2_3, 3, extra={1: ["--delay-ms", "3000"]}) as servers:
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(gpt2_3, endpoints, timeout_s=20, retry_stateless=False) as client:
            futures = [client.submit(f) for f in _feeds(3)]
            time.sleep(1.0)
            started = time.monotonic()
            servers.kill(1)
            for future in futures:
                with pytest.raises(StageFailure) as info:
                    future.result(timeout=20)
                message = str(info.value)
                assert "stage 1" in message and servers.addresses[1] in message, message
            assert time.monotonic() - started < 10.0  # well inside the 20 s deadline
            _balanced(client)
            assert client.counts["failed"] == 3


def test_stalled_stage_hits_the_deadline_then_restart_is_picked_up(gpt2_3: Path) -> None:
    with StageServers(gpt2_3, 3) as servers:
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(gpt2_3, endpoints, timeout_s=20) as client:
            (feeds,) = _feeds(1)
            client.run(feeds)  # warm
            servers.signal(1, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(StageFailure) as info:
                client.run(feeds, timeout_s=2.0)
            elapsed = time.monotonic() - started
            assert 1.9 < elapsed < 6.0, elapsed
            message = str(info.value)
            assert "deadline" in message and "stage 1" in message, message
            assert servers.addresses[1] in message, message
            # The stalled process is replaced by a fresh one on the same port.
            servers.kill(1)
            servers.start(1)
            got = client.run(feeds, timeout_s=20)
            want = Pipeline.open(gpt2_3).run(feeds)
            assert np.array_equal(got["logits"], want["logits"])
            _balanced(client)


def test_stateless_request_lost_with_a_stage_is_retried_once(gpt2_3: Path) -> None:
    with StageServers(gpt2_3, 3, extra={1: ["--delay-ms", "2000"]}) as servers:
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(gpt2_3, endpoints, timeout_s=30) as client:
            (feeds,) = _feeds(1)
            future = client.submit(feeds)
            time.sleep(0.8)
            servers.kill(1)
            servers.start(1)
            got = future.result(timeout=30)
            assert np.array_equal(got["logits"], Pipeline.open(gpt2_3).run(feeds)["logits"])
            assert client.counts["retried"] == 1
            _balanced(client)


def test_full_queue_rejects_at_once_and_nothing_is_lost(gpt2_3: Path) -> None:
    # Stage 0 takes one waiting request at most; its hand-off takes 300 ms each.
    extra = {0: ["--queue", "1", "--delay-ms", "300"]}
    with StageServers(gpt2_3, 3, extra=extra) as servers:
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(gpt2_3, endpoints, timeout_s=30) as client:
            futures = [client.submit(f) for f in _feeds(12)]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result(timeout=30))
                except Rejected as exc:
                    assert exc.code == "RESOURCE_EXHAUSTED"
                    assert "queue is full" in str(exc)
                    outcomes.append(exc)
            rejected = sum(isinstance(o, Rejected) for o in outcomes)
            assert rejected >= 1
            assert client.counts["rejected"] == rejected
            assert client.counts["succeeded"] == len(futures) - rejected
            _balanced(client)


def test_tiny_deadline_fails_with_a_deadline_error(gpt2_3: Path) -> None:
    with StageServers(gpt2_3, 3, extra={1: ["--delay-ms", "500"]}) as servers:
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(gpt2_3, endpoints, timeout_s=30, retry_stateless=False) as client:
            (feeds,) = _feeds(1)
            started = time.monotonic()
            with pytest.raises((StageFailure, Rejected)) as info:
                client.run(feeds, timeout_s=0.2)
            assert time.monotonic() - started < 3.0
            message = str(info.value)
            assert "deadline" in message.lower() or "timed out" in message, message
            # the pipeline is still usable afterwards
            got = client.run(feeds, timeout_s=30)
            assert got["logits"].shape[-1] == 512
            _balanced(client)


# ------------------------------------------------------------------------------ security


def test_non_loopback_bind_without_tls_is_refused(gpt2_3: Path) -> None:
    from tests.cli.helpers import lamc

    outcome = lamc("serve", str(gpt2_3), "--stage", "0", "--listen", "0.0.0.0:50999")
    assert outcome.code == 2, outcome
    text = outcome.stdout + outcome.stderr
    assert "refusing to serve on 0.0.0.0:50999 without TLS" in text
    assert "--insecure" in text


def _openssl(*args: str, cwd: Path) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=lamc-test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=lamc-{name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)  # fmt: skip
    (d / "token").write_text("s3cret-token\n")
    return d


def test_mutual_tls_with_token(gpt2_3: Path, pki: Path) -> None:
    import grpc

    from lamc.runtime.security import TlsConfig

    common = [
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--tls-ca", str(pki / "ca.pem"), "--require-client-cert",
        "--token-file", str(pki / "token"),
    ]  # fmt: skip
    ca = (pki / "ca.pem").read_bytes()
    client_cert, client_key = (pki / "client.pem").read_bytes(), (pki / "client.key").read_bytes()
    credentials = grpc.ssl_channel_credentials(ca, client_key, client_cert)
    (feeds,) = _feeds(1)
    want = Pipeline.open(gpt2_3).run(feeds)
    # The stages present the server certificate to each other as clients, too.
    with StageServers(gpt2_3, 3, common=common, credentials=credentials) as servers:
        stages = dict(enumerate(servers.addresses))
        good = Endpoints(stages, TlsConfig(client_cert, client_key, ca), "s3cret-token")
        with RemotePipeline(gpt2_3, good, timeout_s=20) as client:
            assert np.array_equal(client.run(feeds)["logits"], want["logits"])
        wrong_token = Endpoints(stages, TlsConfig(client_cert, client_key, ca), "guess")
        with RemotePipeline(gpt2_3, wrong_token, timeout_s=5) as client:
            with pytest.raises((StageFailure, Rejected)) as info:
                client.run(feeds)
            assert "token" in str(info.value), info.value
        no_client_cert = Endpoints(stages, TlsConfig(ca=ca), "s3cret-token")
        with pytest.raises(StageFailure) as info:
            RemotePipeline(gpt2_3, no_client_cert, timeout_s=3)
        assert "cannot reach stage 0" in str(info.value)
        plaintext = Endpoints(stages, None, "s3cret-token")
        with pytest.raises(StageFailure):
            RemotePipeline(gpt2_3, plaintext, timeout_s=3)


def test_lossy_link_codec_matches_the_in_process_pipeline(tmp_path: Path) -> None:
    """With fp16 links the stage servers compute exactly what the in-process executor
    (and so `lamc validate`) computes: the same loss at the same places."""
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints
    from tests.compiled import MINIPCS
    from tests.conftest import analysed_model

    out = tmp_path / "fp16"
    request = PlanRequest(constraints=Constraints(stages=3), codec="fp16")
    result = compile_model(
        MODEL, MINIPCS, out, CompileOptions(request=request), analysed=analysed_model(MODEL)
    )
    assert all(t.codec == "fp16" for e in result.manifest.edges[1:-1] for t in e.tensors)
    feeds = _feeds(3, seed=5)
    local = Pipeline.open(out)
    want = [local.run(f) for f in feeds]
    with (
        StageServers(out, 3) as servers,
        RemotePipeline(out, Endpoints(dict(enumerate(servers.addresses)))) as client,
    ):
        got = client.run_many(feeds)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, dict), g
        assert np.array_equal(g["logits"], w["logits"])


# ----------------------------------------------------------------------- emulated links


@pytest.mark.netns
def test_stages_in_network_namespaces_over_shaped_links(gpt2_3: Path) -> None:
    """Each stage in its own namespace, the stage links shaped with tbf and delayed in
    user space: the pipeline still computes exactly what one process computes, and one
    request takes at least the links' serialisation time plus their latency."""
    from tests.runtime.netns import EmulatedLinks, NetnsUnavailable, check_available

    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(f"emulated links need network namespaces: {exc}")
    feeds = _feeds(4, seed=9)
    local = Pipeline.open(gpt2_3)
    want = [local.run(f) for f in feeds]
    rate_mbit, delay_ms = 1.0, 20.0
    edge_bytes = [e.bytes for e in local.manifest.edges[1:-1]]
    delay = ["--delay-ms", str(delay_ms)]
    with (
        EmulatedLinks(3, rate_mbit=rate_mbit) as net,
        StageServers(gpt2_3, 3, extra={0: delay, 1: delay}, net=net) as servers,
        RemotePipeline(gpt2_3, Endpoints(dict(enumerate(servers.addresses)))) as client,
    ):
        assert servers.addresses[0].startswith("10.")
        client.run(feeds[0])
        started = time.monotonic()
        got = client.run(feeds[1])
        elapsed_ms = (time.monotonic() - started) * 1000
        # After an idle spell tbf lets a burst through at once; the rest waits for tokens.
        floor_ms = sum(
            8 * max(b - net.burst_bytes, 0) / (rate_mbit * 1e6) * 1000 + delay_ms
            for b in edge_bytes
        )
        assert elapsed_ms >= 0.9 * floor_ms, (elapsed_ms, floor_ms)
        assert np.array_equal(got["logits"], want[1]["logits"])
        for g, w in zip(client.run_many(feeds), want, strict=True):
            assert isinstance(g, dict) and np.array_equal(g["logits"], w["logits"])
        _balanced(client)

"""Hostile traffic against a live stage: deadlines that are not numbers, a flood of them,
and a client that tries to read another client's answers. The stage stays healthy,
answers every request it accepted, and its final line counts every request it received."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.runtime import wire
from lamc.runtime.executor import Pipeline
from lamc.runtime.hosts import Endpoints
from lamc.runtime.remote import RemotePipeline
from tests.compiled import compile_zoo
from tests.runtime.servers import free_port, wait_serving

MODEL = "zoo:gpt2:test"


@pytest.fixture(scope="module")
def gpt2_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "gpt2"
    compile_zoo(MODEL, out, 1)
    return out


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, size=(1, 8)).astype(np.int64)


def _serve(out: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lamc",
            "serve",
            str(out),
            "--stage",
            "0",
            "--listen",
            address,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_serving(address, process=process)
    return process, address


def _submit(channel: grpc.Channel, timeout_ms: float, request_id: str, client_id: str) -> object:
    call = channel.unary_unary(
        wire.method("Submit"),
        request_serializer=wire.SubmitRequest.SerializeToString,
        response_deserializer=wire.Ack.FromString,
    )
    message = wire.SubmitRequest(
        request_id=request_id,
        client_id=client_id,
        timeout_ms=timeout_ms,
        tensors=[wire.encode("input_ids", _ids())],
    )
    return call(message, timeout=5)


def test_a_flood_of_non_finite_deadlines_leaves_the_stage_serving(gpt2_1: Path) -> None:
    process, address = _serve(gpt2_1, "--queue", "4")
    try:
        hostile = [math.nan, math.inf, -math.inf, 1e300]
        acks = []
        with grpc.insecure_channel(address) as channel:
            for k in range(100):
                acks.append(_submit(channel, hostile[k % 4], f"h{k}", "attacker"))
        refused = [a for a in acks if not a.accepted]  # type: ignore[attr-defined]
        # Not-a-number and infinite deadlines are refused as invalid, naming the deadline.
        invalid = [a for a in refused if a.code == "INVALID_ARGUMENT"]  # type: ignore[attr-defined]
        assert len(invalid) == 75
        assert all("finite" in a.message for a in invalid)  # type: ignore[attr-defined]
        # 1e300 ms is cut to the server's maximum: accepted while the queue has room, and
        # every one accepted is worked off (none holds its slot for ever).
        accepted = [a for a in acks if a.accepted]  # type: ignore[attr-defined]
        assert accepted
        # A well-behaved client is answered after the flood.
        with RemotePipeline(gpt2_1, Endpoints({0: address}), timeout_s=30) as client:
            got = client.run({"input_ids": _ids(1)})
        want = Pipeline.open(gpt2_1).run({"input_ids": _ids(1)})
        assert np.array_equal(got["logits"], want["logits"])
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    final = output.strip().splitlines()[-1]
    match = re.search(
        r"(\d+) received, (\d+) accepted, (\d+) handed on, (\d+) failed, (\d+) refused", final
    )
    assert match, final
    received, took, handed, failed, refused_count = (int(g) for g in match.groups())
    assert received == 101, final  # the flood and the good request, every one counted
    assert took + refused_count == received
    assert handed + failed == took, final


def test_answers_go_only_to_the_client_that_asked(gpt2_1: Path) -> None:
    process, address = _serve(gpt2_1)
    try:
        # The attacker knows the victim's client id (every stage sees it) and subscribes
        # with it as its secret: it is a different client.
        with (
            RemotePipeline(gpt2_1, Endpoints({0: address}), timeout_s=30) as victim,
            grpc.insecure_channel(address) as channel,
        ):
            subscribe = channel.unary_stream(
                wire.method("Subscribe"),
                request_serializer=wire.SubscribeRequest.SerializeToString,
                response_deserializer=wire.Delivery.FromString,
            )
            stream = subscribe(wire.SubscribeRequest(client_secret=victim.client_id), timeout=3)
            got = victim.run({"input_ids": _ids(2)})
            assert got["logits"].shape[-1] == 512
            stolen = []
            with pytest.raises(grpc.RpcError) as ended:
                for delivery in stream:
                    stolen.append(delivery)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert stolen == []
            # A subscription without a secret is refused outright.
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(subscribe(wire.SubscribeRequest(), timeout=3)))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        process.kill()
        process.wait(timeout=10)


def test_deadline_too_far_is_cut_to_the_server_maximum(gpt2_1: Path) -> None:
    process, address = _serve(gpt2_1, "--max-deadline-s", "0.001", "--delay-ms", "0")
    try:
        with grpc.insecure_channel(address) as channel:
            ack = _submit(channel, 1e300, "far", "someone")
        assert ack.accepted  # type: ignore[attr-defined]
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    # With a 1 ms cap the request expires in the queue: failed, not held for ever.
    assert " 1 accepted, " in output and (" 1 failed" in output or " 1 handed on" in output)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--listen", "127.0.0.1:99999"], "a port from 1 to 65535"),
        (["--listen", "127.0.0.1"], "expected HOST:PORT"),
        (["--listen", "127.0.0.1:5999", "--tls-cert", "{bad}", "--tls-key", "{bad}"], "not a PEM"),
        (["--listen", "127.0.0.1:5999", "--tls-ca", "{bad}"], "--tls-ca"),
    ],
)
def test_bad_serving_flags_are_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    from tests.cli.helpers import lamc

    bad = tmp_path / "garbage.pem"
    bad.write_text("not a certificate\n")
    outcome = lamc(
        "serve", str(tmp_path / "out"), "--stage", "0", *[a.format(bad=bad) for a in args]
    )
    assert outcome.code == 2, outcome.stdout + outcome.stderr
    assert needle in outcome.final, outcome.final


_TENSORS = st.lists(
    st.builds(
        lambda name, datatype, shape, raw, codec, scale: wire.Tensor(
            name=name, datatype=datatype, shape=shape, raw=raw, codec=codec, scale=scale
        ),
        st.sampled_from(["input_ids", "x", "", "a" * 300]),
        st.sampled_from(["INT64", "FP32", "FP16", "INT8", "BOOL", "BYTES", "", "??"]),
        st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=5),
        st.binary(max_size=256),
        st.sampled_from(["raw", "fp16", "int8", "", "zstd"]),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
    ),
    max_size=3,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=_TENSORS,
    timeout_ms=st.floats(allow_nan=True, allow_infinity=True),
    sequence=st.sampled_from(["", "s1", "x" * 500]),
    position=st.integers(min_value=-(2**62), max_value=2**62),
    token=st.sampled_from([None, "", "Bearer x", "\x7f" * 10]),
)
def test_random_payloads_get_an_answer_and_leave_the_stage_healthy(
    served: tuple[Path, str],
    tensors: list[object],
    timeout_ms: float,
    sequence: str,
    position: int,
    token: str | None,
) -> None:
    _, address = served
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            wire.method("Submit"),
            request_serializer=wire.SubmitRequest.SerializeToString,
            response_deserializer=wire.Ack.FromString,
        )
        message = wire.SubmitRequest(
            request_id="fuzz",
            client_id="fuzz",
            timeout_ms=timeout_ms,
            tensors=tensors,
            sequence_id=sequence,
            position=position,
        )
        metadata = (("authorization", token),) if token is not None else None
        try:
            ack = call(message, timeout=10, metadata=metadata)
        except grpc.RpcError as exc:  # refused by gRPC itself (bad metadata): still an answer
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED
            return
        if not ack.accepted:
            assert ack.code and ack.message


@pytest.fixture(scope="module")
def served(gpt2_1: Path) -> Iterator[tuple[Path, str]]:
    process, address = _serve(gpt2_1, "--max-deadline-s", "2")
    try:
        yield gpt2_1, address
        # After the fuzzing the stage still answers a well-formed request.
        with RemotePipeline(gpt2_1, Endpoints({0: address}), timeout_s=30) as client:
            got = client.run({"input_ids": _ids(3)})
        assert got["logits"].shape[-1] == 512
        assert process.poll() is None
    finally:
        process.kill()
        process.wait(timeout=10)


def _idle_connection_survives(server_opts: list[tuple[str, object]], keepalive_ms: int) -> bool:
    """Serve the health service with `server_opts`, connect a client that pings every
    `keepalive_ms`, leave the connection idle for 6 pings, and say whether it stayed up
    (a GOAWAY too_many_pings drops it, and the channel leaves READY)."""
    import threading
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from lamc.runtime.security import channel_options

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_opts)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    states: list[grpc.ChannelConnectivity] = []
    lock = threading.Lock()

    def seen(state: grpc.ChannelConnectivity) -> None:
        with lock:
            states.append(state)

    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=channel_options(1 << 20, None, keepalive_ms)
    )
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        channel.subscribe(seen)
        time.sleep(6 * keepalive_ms / 1000)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        with lock:
            return all(s == grpc.ChannelConnectivity.READY for s in states)
    finally:
        channel.close()
        server.stop(None)


@pytest.mark.slow
def test_idle_connections_are_not_dropped_for_their_keepalive_pings() -> None:
    """The stage server accepts the pings its clients send between requests. The control
    shows the check can fail: gRPC's default server drops a connection pinging this often."""
    from lamc.runtime.security import server_options

    # The production settings scaled down 10x, in the same ratios (gRPC sends no keepalive
    # pings much faster than this, whatever it is asked).
    keepalive_ms = 1000
    assert _idle_connection_survives(server_options(1 << 20, keepalive_ms), keepalive_ms)
    assert not _idle_connection_survives([], keepalive_ms)

"""`lamc ingress`: the KServe v2 gRPC protocol in front of a compiled pipeline, called by
the standard client (tritonclient.grpc), by hand-built typed-contents requests, and
through server reflection; over stages in one process and over stage servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lamc.runtime import kserve
from tests.compiled import compile_zoo
from tests.runtime.servers import StageServers, free_port, wait_serving

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient is a dev dependency")

MODEL = "zoo:gpt2:test"
NAME = "gpt2-test"  # the manifest's model name
TOKEN = "kserve-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def gpt2_2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kserve") / "gpt2"
    compile_zoo(MODEL, out, 2)
    return out


class Ingress:
    """A `lamc ingress` process on a loopback port."""

    def __init__(self, out: Path, log: Path, *extra: str) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lamc", "ingress", str(out), "--listen", self.address, *extra],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "LAMC_TOKEN": TOKEN},
        )
        try:
            wait_serving(self.address, process=self.process, service=kserve.SERVICE)
        except BaseException:
            self.process.kill()
            raise

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        return code, self.log.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def ingress(gpt2_2: Path, tmp_path: Path) -> Iterator[Ingress]:
    server = Ingress(gpt2_2, tmp_path / "ingress.log")
    yield server
    server.kill()


def _ids(seed: int, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, size=(batch, seq)).astype(np.int64)


def _infer(client: object, ids: np.ndarray, **kwargs: object) -> np.ndarray:
    given = tritonclient.InferInput("input_ids", list(ids.shape), "INT64")
    given.set_data_from_numpy(ids)
    result = client.infer(NAME, [given], headers=AUTH, **kwargs)  # type: ignore[attr-defined]
    logits: np.ndarray = result.as_numpy("logits")
    return logits


def _lamc_run(out: Path, ids: np.ndarray, tmp_path: Path) -> np.ndarray:
    """The outputs `lamc run` writes for `ids`."""
    np.save(tmp_path / "ids.npy", ids)
    done = subprocess.run(
        [sys.executable, "-m", "lamc", "run", str(out), "--input", f"input_ids={tmp_path / 'ids.npy'}",
         "--output", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    logits: np.ndarray = np.load(tmp_path / "run" / "logits.npy")
    return logits


def test_tritonclient_gets_what_lamc_run_gives(
    gpt2_2: Path, ingress: Ingress, tmp_path: Path
) -> None:
    client = tritonclient.InferenceServerClient(ingress.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME, headers=AUTH)
    metadata = client.get_model_metadata(NAME, headers=AUTH)
    assert metadata.name == NAME and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input_ids", "INT64", [-1, -1])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, -1, 512])
    ]
    ids = _ids(0, 2, 9)
    got = _infer(client, ids)
    want = _lamc_run(gpt2_2, ids, tmp_path)
    assert got.dtype == want.dtype and got.shape == want.shape == (2, 9, 512)
    assert np.array_equal(got, want)
    # Another size, and the output asked for by name.
    other = _ids(1, 1, 17)
    asked = _infer(client, other, outputs=[tritonclient.InferRequestedOutput("logits")])
    assert asked.shape == (1, 17, 512)
    from lamc.runtime.executor import Pipeline

    assert np.array_equal(asked, Pipeline.open(gpt2_2).run({"input_ids": other})["logits"])
    code, log = ingress.stop()
    assert code == 0, log
    assert "2 answered, 0 failed" in log.splitlines()[-1], log[-1000:]


def _stub(address: str, method: str, request: str, response: str) -> object:
    channel = grpc.insecure_channel(address)
    return channel.unary_unary(
        f"/{kserve.SERVICE}/{method}",
        request_serializer=kserve.MESSAGES[request].SerializeToString,
        response_deserializer=kserve.MESSAGES[response].FromString,
    )


def test_typed_contents_errors_auth_and_reflection(gpt2_2: Path, ingress: Ingress) -> None:
    from lamc.runtime.executor import Pipeline

    infer = _stub(ingress.address, "ModelInfer", "ModelInferRequest", "ModelInferResponse")
    metadata = tuple(AUTH.items())
    ids = _ids(2, 1, 5)
    request = kserve.MESSAGES["ModelInferRequest"](model_name=NAME, id="typed-1")
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 5])
    request.inputs[0].contents.int64_contents.extend(ids.ravel().tolist())
    reply = infer(request, metadata=metadata)  # type: ignore[operator]
    assert reply.id == "typed-1" and reply.outputs[0].name == "logits"
    got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(reply.outputs[0].shape)
    want = Pipeline.open(gpt2_2).run({"input_ids": ids})["logits"]
    assert np.array_equal(got, want)

    def status_of(req: object, md: tuple[tuple[str, str], ...] = metadata) -> tuple[object, str]:
        with pytest.raises(grpc.RpcError) as caught:
            infer(req, metadata=md)  # type: ignore[operator]
        return caught.value.code(), caught.value.details()  # type: ignore[attr-defined]

    code, details = status_of(request, ())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    wrong_name = kserve.MESSAGES["ModelInferRequest"]()
    wrong_name.CopyFrom(request)
    wrong_name.model_name = "resnet"
    code, details = status_of(wrong_name)
    assert code == grpc.StatusCode.NOT_FOUND and NAME in details
    short = kserve.MESSAGES["ModelInferRequest"](model_name=NAME)
    short.inputs.add(name="input_ids", datatype="INT64", shape=[1, 5])
    short.raw_input_contents.append(ids.astype("<i8").tobytes()[:-8])
    code, details = status_of(short)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "takes 40 bytes, got 32" in details
    int32 = kserve.MESSAGES["ModelInferRequest"](model_name=NAME)
    int32.inputs.add(name="input_ids", datatype="INT32", shape=[1, 5])
    int32.raw_input_contents.append(ids.astype("<i4").tobytes())
    code, details = status_of(int32)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected dtype int64" in details
    unknown_output = kserve.MESSAGES["ModelInferRequest"]()
    unknown_output.CopyFrom(request)
    unknown_output.outputs.add(name="hidden")
    code, details = status_of(unknown_output)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown output(s) hidden" in details
    too_long = kserve.MESSAGES["ModelInferRequest"](model_name=NAME)
    too_long.inputs.add(name="input_ids", datatype="INT64", shape=[1, 300])
    too_long.inputs[0].contents.int64_contents.extend([0] * 300)
    code, details = status_of(too_long)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "seq in 1..256" in details

    # Server reflection describes the protocol (what grpcurl asks for).
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(ingress.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert kserve.SERVICE in database.get_services()
        described = DescriptorPool(database).FindServiceByName(kserve.SERVICE)
        assert {m.name for m in described.methods} >= {
            "ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelInfer",
        }  # fmt: skip


def test_ingress_over_stage_servers(gpt2_2: Path, tmp_path: Path) -> None:
    from lamc.runtime.executor import Pipeline

    local = Pipeline.open(gpt2_2)
    batch = [_ids(10 + k, 1, 6 + k) for k in range(6)]
    want = [local.run({"input_ids": ids})["logits"] for ids in batch]
    with StageServers(gpt2_2, 2, env={"LAMC_TOKEN": TOKEN}) as servers:
        endpoints = [f"--endpoint={k}={a}" for k, a in enumerate(servers.addresses)]
        server = Ingress(gpt2_2, tmp_path / "ingress.log", *endpoints)
        try:
            client = tritonclient.InferenceServerClient(server.address)
            assert client.is_server_ready()
            # Six requests in flight at once through the two stage servers.
            answers: list[object] = []
            for ids in batch:
                given = tritonclient.InferInput("input_ids", list(ids.shape), "INT64")
                given.set_data_from_numpy(ids)
                client.async_infer(
                    NAME,
                    [given],
                    callback=lambda result, error: answers.append(error or result),
                    headers=AUTH,
                )
            import time

            deadline = time.monotonic() + 60
            while len(answers) < len(batch) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(answers) == len(batch)
            got = {}
            for answer in answers:
                assert not isinstance(answer, Exception), answer
                logits = answer.as_numpy("logits")  # type: ignore[attr-defined]
                got[logits.shape[1]] = logits
            for ids, expected in zip(batch, want):
                assert np.array_equal(got[ids.shape[1]], expected)
            code, log = server.stop()
            assert code == 0 and "6 answered, 0 failed" in log, log[-1000:]
        finally:
            server.kill()


# ----------------------------------------------------------------- conversions, no server


def test_conversions_refuse_what_does_not_fit() -> None:
    ok = kserve.from_values("x", "INT32", [2, 2], [1, 2, 3, 4])
    assert ok.dtype == np.int32 and ok.tolist() == [[1, 2], [3, 4]]
    nested = kserve.from_values("x", "FP32", [2, 2], [[1.5, 2], [3, 4]])
    assert nested.dtype == np.float32 and nested[0, 0] == 1.5
    cases = [
        (lambda: kserve.from_values("x", "INT8", [1], [300]), "out of the range of INT8"),
        (lambda: kserve.from_values("x", "INT64", [3], [1, 2]), "takes 3 values, got 2"),
        (lambda: kserve.from_values("x", "INT64", [1], [1.5]), "must be integers"),
        (lambda: kserve.from_values("x", "BYTES", [1], [b"a"]), "datatype 'BYTES'"),
        (lambda: kserve.from_raw("x", "FP32", [2, -1], b""), "negative dimension"),
        (lambda: kserve.rest_inputs([]), '"inputs" list'),
        (
            lambda: kserve.rest_inputs({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1.0], "data": [1]}]}),
            "shape must be a list of integers",
        ),
        (
            lambda: kserve.rest_inputs({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}] * 2}),
            "given twice",
        ),
    ]  # fmt: skip
    for call, words in cases:
        with pytest.raises(kserve.InferError) as caught:
            call()
        assert caught.value.code == "INVALID_ARGUMENT" and words in str(caught.value)
    raw = kserve.from_raw("x", "FP16", [3], np.array([1, 2, 3], "<f2").tobytes())
    assert raw.dtype == np.float16 and raw.tolist() == [1.0, 2.0, 3.0]
    feeds, wanted, request_id = kserve.rest_inputs(
        {"id": "r1", "inputs": [{"name": "a", "datatype": "BOOL", "shape": [2], "data": [True, False]}],
         "outputs": [{"name": "b"}]}
    )  # fmt: skip
    assert feeds["a"].dtype == np.bool_ and wanted == ["b"] and request_id == "r1"
    body = kserve.rest_outputs("m", "r1", {"b": np.arange(4, dtype=np.int64).reshape(2, 2)})
    assert body["outputs"] == [
        {"name": "b", "datatype": "INT64", "shape": [2, 2], "data": [0, 1, 2, 3]}
    ]
    assert body["id"] == "r1" and body["model_name"] == "m"


def test_descriptor_set_is_compiled_from_the_proto(tmp_path: Path) -> None:
    """The checked-in descriptor set is what `make proto` makes from the .proto."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is a dev dependency")
    protos = kserve.DESCRIPTOR_SET.parent
    fresh = tmp_path / "fresh.binpb"
    code = protoc.main(
        ["protoc", f"-I{protos}", f"--descriptor_set_out={fresh}", "grpc_predict_v2.proto"]
    )
    assert code == 0
    assert fresh.read_bytes() == kserve.DESCRIPTOR_SET.read_bytes(), "run `make proto`"


def test_busy_lost_and_late_requests_get_their_status() -> None:
    """Without a server: more than --max-in-flight at once is RESOURCE_EXHAUSTED, a stage
    lost is UNAVAILABLE and an answer past the deadline DEADLINE_EXCEEDED."""
    import asyncio

    from lamc.runtime.failover import StageFailure
    from lamc.verify import read_manifest

    class Aborted(Exception):
        def __init__(self, code: object, details: str) -> None:
            super().__init__(details)
            self.code = code

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return ()

        def time_remaining(self) -> float:
            return 5.0

        async def abort(self, code: object, details: str) -> None:
            raise Aborted(code, details)

    class Backend:
        def __init__(self, manifest: object, outcome: BaseException | None) -> None:
            self.manifest = manifest
            self.outcome = outcome
            self.release = asyncio.Event()

        def ready(self) -> bool:
            return True

        async def infer(
            self, feeds: dict[str, np.ndarray], timeout_s: float | None
        ) -> dict[str, np.ndarray]:
            await self.release.wait()
            if self.outcome is not None:
                raise self.outcome
            return {"logits": np.zeros((1, 2, 512), np.float32)}

        def close(self) -> None:
            pass

    import tempfile
    from pathlib import Path as _Path

    from tests.compiled import compile_zoo

    with tempfile.TemporaryDirectory() as tmp:
        out = _Path(tmp) / "gpt2"
        compile_zoo(MODEL, out, 1)
        manifest = read_manifest(out)
    request = kserve.MESSAGES["ModelInferRequest"](model_name=NAME)
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2])
    request.raw_input_contents.append(np.array([[1, 2]], "<i8").tobytes())

    async def scenario() -> list[object]:
        codes = []
        busy = Backend(manifest, None)
        ingress = kserve.Ingress(busy, NAME, max_in_flight=1)
        first = asyncio.ensure_future(ingress.model_infer(request, Context()))
        await asyncio.sleep(0.05)
        try:
            await ingress.model_infer(request, Context())
        except Aborted as exc:
            codes.append(exc.code)
        busy.release.set()
        await first
        for outcome in (StageFailure("stage 1 at h:1 went down"), TimeoutError("late")):
            failing = Backend(manifest, outcome)
            failing.release.set()
            try:
                await kserve.Ingress(failing, NAME).model_infer(request, Context())
            except Aborted as exc:
                codes.append(exc.code)
        return codes

    assert asyncio.run(scenario()) == [
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    ]  # fmt: skip

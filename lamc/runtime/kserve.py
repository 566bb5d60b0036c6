"""The KServe v2 inference protocol (Open Inference Protocol) in front of a compiled
pipeline: `lamc ingress OUT --listen HOST:PORT`.

Standard clients (tritonclient.grpc, KServe's InferenceGRPCClient, grpcurl through server
reflection) call `inference.GRPCInferenceService` with the model's own input and output
names; the ingress runs each request through the pipeline, either every stage in this
process or the stage servers of `lamc serve` (`--hosts`), and answers in the protocol's
raw little-endian contents.

The messages come from lamc/protos/grpc_predict_v2.binpb, the descriptor set protoc
compiled from grpc_predict_v2.proto beside it, loaded into a pool of lamc's own (so a
client of the same protocol imported in the same process never collides with it).

The same conversions serve the v2 REST protocol of the Ray Serve ingress
(`lamc.runtime.ray_serve`): `rest_inputs` and `rest_outputs`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from lamc.errors import UsageError
from lamc.manifest import Manifest

SERVICE = "inference.GRPCInferenceService"
DESCRIPTOR_SET = Path(__file__).resolve().parent.parent / "protos" / "grpc_predict_v2.binpb"
PLATFORM = "lamc_pipeline"
VERSION = "1"  # a compiled pipeline is one version of its model

# Protocol datatypes <-> numpy (BYTES, strings, is not a tensor type a compiled stage takes).
DATATYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}

# Where each datatype's values sit in `InferTensorContents` (FP16 travels raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

_NAMES = (
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelInferRequest",
    "ModelInferResponse",
)


def _load_pool() -> tuple[descriptor_pool.DescriptorPool, dict[str, Any]]:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    classes = {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
        for name in _NAMES
    }
    return pool, classes


POOL, MESSAGES = _load_pool()


class InferError(Exception):
    """A request the ingress answers with a gRPC status (`code`, a grpc.StatusCode name)
    or an HTTP status (`http`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def http(self) -> int:
        return {
            "INVALID_ARGUMENT": 400,
            "UNAUTHENTICATED": 401,
            "NOT_FOUND": 404,
            "RESOURCE_EXHAUSTED": 429,
            "DEADLINE_EXCEEDED": 504,
            "UNAVAILABLE": 503,
        }.get(self.code, 500)


def model_name(manifest: Manifest, out: Path) -> str:
    """The name a compiled model is served under: its name in the manifest (or OUT's
    directory name), with anything but letters, digits, '-', '_' and '.' made '-'."""
    name = str(manifest.model.get("name") or Path(out).resolve().name)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def check_model(served: str, name: str, version: str) -> None:
    """NOT_FOUND unless `name` (and `version`, where given) is the model served."""
    if name != served:
        raise InferError("NOT_FOUND", f"no model {name!r} here; this server has {served!r}")
    if version not in ("", VERSION):
        raise InferError("NOT_FOUND", f"model {name} has version {VERSION} only, not {version!r}")


def check_servable(manifest: Manifest) -> None:
    """Every input and output must have a protocol datatype (exit 2 naming one that has not)."""
    for name in (*manifest.inputs, *manifest.outputs):
        dtype = manifest.tensors[name].dtype
        if dtype not in NUMPY_TO_DATATYPE:
            raise UsageError(f"tensor {name} has dtype {dtype}, which KServe v2 cannot carry")


def tensor_metadata(manifest: Manifest, names: Sequence[str]) -> list[dict[str, Any]]:
    """Name, datatype and shape (-1 for a dim that varies) of each named tensor."""
    result = []
    for name in names:
        spec = manifest.tensors[name]
        shape = []
        for dim in spec.shape:
            if isinstance(dim, int):
                shape.append(dim)
            else:
                bounds = manifest.dims.get(dim)
                fixed = bounds is not None and bounds.min == bounds.max
                shape.append(bounds.min if fixed and bounds is not None else -1)
        result.append({"name": name, "datatype": NUMPY_TO_DATATYPE[spec.dtype], "shape": shape})
    return result


def _shape(name: str, dims: Sequence[Any]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InferError("INVALID_ARGUMENT", f"input {name}: negative dimension in {list(shape)}")
    return shape


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    numpy_name = DATATYPES.get(datatype)
    if numpy_name is None:
        raise InferError(
            "INVALID_ARGUMENT",
            f"input {name}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}",
        )
    return np.dtype(numpy_name)


def from_raw(name: str, datatype: str, dims: Sequence[Any], raw: bytes) -> np.ndarray:
    """A tensor from its raw contents (little-endian, row-major)."""
    dtype, shape = _dtype(name, datatype), _shape(name, dims)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InferError(
            "INVALID_ARGUMENT",
            f"input {name}: {datatype}{list(shape)} takes {expected} bytes, got {len(raw)}",
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def from_values(name: str, datatype: str, dims: Sequence[Any], values: Sequence[Any]) -> np.ndarray:
    """A tensor from a flat list of values (typed contents, or REST's `data`)."""
    dtype, shape = _dtype(name, datatype), _shape(name, dims)
    count = math.prod(shape)
    flat = np.asarray(values)
    if flat.ndim != 1:
        flat = flat.reshape(-1)  # REST allows nested lists in row-major order
    if flat.size != count:
        raise InferError(
            "INVALID_ARGUMENT",
            f"input {name}: {datatype}{list(shape)} takes {count} values, got {flat.size}",
        )
    if dtype.kind in "iu" and flat.size and flat.dtype.kind not in "iub":
        raise InferError("INVALID_ARGUMENT", f"input {name}: {datatype} values must be integers")
    if dtype.kind in "iu" and flat.size:
        info = np.iinfo(dtype)
        low, high = int(flat.min()), int(flat.max())
        if low < info.min or high > info.max:
            raise InferError(
                "INVALID_ARGUMENT", f"input {name}: a value is out of the range of {datatype}"
            )
    return flat.astype(dtype).reshape(shape)


def to_raw(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def grpc_inputs(request: Any) -> dict[str, np.ndarray]:
    """The tensors of a `ModelInferRequest`, from raw or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InferError(
            "INVALID_ARGUMENT",
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs",
        )
    feeds: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(request.inputs):
        if tensor.name in feeds:
            raise InferError("INVALID_ARGUMENT", f"input {tensor.name} is given twice")
        if raw:
            if tensor.HasField("contents"):
                raise InferError(
                    "INVALID_ARGUMENT",
                    f"input {tensor.name}: give raw_input_contents or contents, not both",
                )
            feeds[tensor.name] = from_raw(tensor.name, tensor.datatype, tensor.shape, raw[k])
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            if tensor.datatype in DATATYPES:  # FP16
                raise InferError(
                    "INVALID_ARGUMENT",
                    f"input {tensor.name}: {tensor.datatype} travels in raw_input_contents only",
                )
            _dtype(tensor.name, tensor.datatype)  # names the unknown datatype
        assert field is not None
        values = list(getattr(tensor.contents, field))
        feeds[tensor.name] = from_values(tensor.name, tensor.datatype, tensor.shape, values)
    return feeds


def rest_inputs(body: Any) -> tuple[dict[str, np.ndarray], list[str], str]:
    """The tensors, the requested output names and the request id of a v2 REST body."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InferError("INVALID_ARGUMENT", 'the body must be a JSON object with an "inputs" list')
    feeds: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(body["inputs"]):
        if not isinstance(tensor, dict):
            raise InferError("INVALID_ARGUMENT", f"inputs[{k}] must be an object")
        name, datatype, shape, data = (
            tensor.get("name"),
            tensor.get("datatype"),
            tensor.get("shape"),
            tensor.get("data"),
        )
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InferError("INVALID_ARGUMENT", f"inputs[{k}] needs a name and a datatype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InferError("INVALID_ARGUMENT", f"input {name}: shape must be a list of integers")
        if not isinstance(data, list):
            raise InferError("INVALID_ARGUMENT", f"input {name}: data must be a list")
        if name in feeds:
            raise InferError("INVALID_ARGUMENT", f"input {name} is given twice")
        try:
            feeds[name] = from_values(name, datatype, shape, data)
        except (ValueError, TypeError) as exc:
            raise InferError("INVALID_ARGUMENT", f"input {name}: {exc}") from None
    wanted = []
    for k, output in enumerate(body.get("outputs") or []):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InferError("INVALID_ARGUMENT", f"outputs[{k}] needs a name")
        wanted.append(output["name"])
    request_id = body.get("id", "")
    return feeds, wanted, request_id if isinstance(request_id, str) else ""


def rest_outputs(name: str, request_id: str, outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A v2 REST response body."""
    body: dict[str, Any] = {
        "model_name": name,
        "model_version": VERSION,
        "outputs": [
            {
                "name": key,
                "datatype": NUMPY_TO_DATATYPE[value.dtype.name],
                "shape": list(value.shape),
                "data": value.reshape(-1).tolist(),
            }
            for key, value in outputs.items()
        ],
    }
    if request_id:
        body["id"] = request_id
    return body


def pick_outputs(manifest: Manifest, wanted: Sequence[str]) -> list[str]:
    """The outputs to answer with: those asked for (each the model's), or all of them."""
    unknown = [n for n in wanted if n not in manifest.outputs]
    if unknown:
        raise InferError(
            "INVALID_ARGUMENT",
            f"unknown output(s) {', '.join(unknown)}; the model gives {', '.join(manifest.outputs)}",
        )
    return list(dict.fromkeys(wanted)) or list(manifest.outputs)


def check_inputs(manifest: Manifest, feeds: Mapping[str, np.ndarray]) -> None:
    """Exactly the model's inputs (the pipeline checks dtypes and shapes against the
    manifest, naming what is wrong)."""
    unknown = sorted(set(feeds) - set(manifest.inputs))
    missing = [n for n in manifest.inputs if n not in feeds]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown input(s) {', '.join(unknown)}")
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        raise InferError(
            "INVALID_ARGUMENT",
            f"{'; '.join(parts)}; the model takes {', '.join(manifest.inputs)}",
        )


# ----------------------------------------------------------------------------- backends


class Backend(Protocol):
    manifest: Manifest

    def ready(self) -> bool: ...

    async def infer(
        self, feeds: dict[str, np.ndarray], timeout_s: float | None
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class LocalBackend:
    """Every stage in this process (`lamc ingress OUT` without stage servers): one request
    at a time through the pipeline, on a thread of its own."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.manifest: Manifest = pipeline.manifest
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lamc-ingress")

    def ready(self) -> bool:
        return True

    async def infer(
        self, feeds: dict[str, np.ndarray], timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        result: dict[str, np.ndarray] = await loop.run_in_executor(
            self._thread, self.pipeline.run, feeds
        )
        return result

    def close(self) -> None:
        self._thread.shutdown(wait=False)


class RemoteBackend:
    """The stage servers of `lamc serve`, through lamc's own client (with its failover,
    retries of stateless requests and variants)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.manifest: Manifest = pipeline.manifest

    def ready(self) -> bool:
        return bool(self.pipeline.reachable())

    async def infer(
        self, feeds: dict[str, np.ndarray], timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        future = self.pipeline.submit(feeds, timeout_s=timeout_s)
        result: dict[str, np.ndarray] = await asyncio.wrap_future(future)
        return result

    def close(self) -> None:
        self.pipeline.close()


def classify(exc: BaseException) -> InferError:
    """The protocol status of a request the pipeline did not answer."""
    from lamc.errors import LamcError

    if isinstance(exc, InferError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return InferError("DEADLINE_EXCEEDED", f"no answer in time: {exc}")
    code = getattr(exc, "code", None)  # `Rejected` by stage 0: its own status
    if isinstance(code, str) and code.isupper():
        return InferError(code, str(exc))
    from lamc.runtime.failover import StageFailure

    if isinstance(exc, StageFailure):
        return InferError("UNAVAILABLE", str(exc))
    if isinstance(exc, UsageError):  # the tensors did not match the manifest
        return InferError("INVALID_ARGUMENT", str(exc))
    if isinstance(exc, LamcError):
        return InferError("INTERNAL", str(exc))
    return InferError("INTERNAL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


# ------------------------------------------------------------------------------ service


class Ingress:
    """`inference.GRPCInferenceService` over a backend. Every RPC but ServerLive and
    ServerReady (what health probes call) needs the token when one is set; at most
    `max_in_flight` requests run at once, more are answered RESOURCE_EXHAUSTED."""

    def __init__(
        self,
        backend: Backend,
        name: str,
        *,
        token: str | None = None,
        max_in_flight: int = 64,
    ) -> None:
        check_servable(backend.manifest)
        self.backend = backend
        self.manifest = backend.manifest
        self.name = name
        self.token = token
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.draining = False
        self.counts = {"answered": 0, "failed": 0, "refused": 0}

    def handlers(self) -> Any:
        import grpc

        def unary(fn: Any, request: str, response: str) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=MESSAGES[request].FromString,
                response_serializer=MESSAGES[response].SerializeToString,
            )

        methods = {
            "ServerLive": unary(self.server_live, "ServerLiveRequest", "ServerLiveResponse"),
            "ServerReady": unary(self.server_ready, "ServerReadyRequest", "ServerReadyResponse"),
            "ModelReady": unary(self.model_ready, "ModelReadyRequest", "ModelReadyResponse"),
            "ServerMetadata": unary(
                self.server_metadata, "ServerMetadataRequest", "ServerMetadataResponse"
            ),
            "ModelMetadata": unary(
                self.model_metadata, "ModelMetadataRequest", "ModelMetadataResponse"
            ),
            "ModelInfer": unary(self.model_infer, "ModelInferRequest", "ModelInferResponse"),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    # -------------------------------------------------------------------------- checks

    async def _abort(self, context: Any, error: InferError) -> NoReturn:
        import grpc

        await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        raise AssertionError("abort returned")  # it raises, always

    async def _authorise(self, context: Any) -> None:
        from lamc.runtime.security import token_matches

        if not token_matches(self.token, context.invocation_metadata()):
            await self._abort(context, InferError("UNAUTHENTICATED", "missing or wrong token"))

    async def _model(self, context: Any, name: str, version: str) -> None:
        try:
            check_model(self.name, name, version)
        except InferError as error:
            await self._abort(context, error)

    # ---------------------------------------------------------------------------- RPCs

    async def server_live(self, request: Any, context: Any) -> Any:
        return MESSAGES["ServerLiveResponse"](live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        return MESSAGES["ServerReadyResponse"](ready=self.backend.ready() and not self.draining)

    async def model_ready(self, request: Any, context: Any) -> Any:
        await self._authorise(context)
        await self._model(context, request.name, request.version)
        return MESSAGES["ModelReadyResponse"](ready=self.backend.ready() and not self.draining)

    async def server_metadata(self, request: Any, context: Any) -> Any:
        from lamc import __version__

        await self._authorise(context)
        return MESSAGES["ServerMetadataResponse"](name="lamc", version=__version__, extensions=[])

    async def model_metadata(self, request: Any, context: Any) -> Any:
        await self._authorise(context)
        await self._model(context, request.name, request.version)
        return MESSAGES["ModelMetadataResponse"](**model_metadata(self.manifest, self.name))

    async def model_infer(self, request: Any, context: Any) -> Any:
        await self._authorise(context)
        await self._model(context, request.model_name, request.model_version)
        if self.draining:
            await self._abort(context, InferError("UNAVAILABLE", "the ingress is shutting down"))
        if self.in_flight >= self.max_in_flight:
            self.counts["refused"] += 1
            await self._abort(
                context,
                InferError(
                    "RESOURCE_EXHAUSTED",
                    f"{self.max_in_flight} requests are in flight already",
                ),
            )
        self.in_flight += 1
        try:
            outputs = await self.infer(
                grpc_inputs(request),
                [o.name for o in request.outputs],
                context.time_remaining(),
            )
        except InferError as error:
            self.counts["failed"] += 1
            await self._abort(context, error)
        finally:
            self.in_flight -= 1
        self.counts["answered"] += 1
        reply = MESSAGES["ModelInferResponse"](
            model_name=self.name, model_version=VERSION, id=request.id
        )
        for key, value in outputs.items():
            reply.outputs.add(
                name=key, datatype=NUMPY_TO_DATATYPE[value.dtype.name], shape=list(value.shape)
            )
            reply.raw_output_contents.append(to_raw(value))
        return reply

    async def infer(
        self, feeds: dict[str, np.ndarray], wanted: Sequence[str], timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        return await answer(
            self.manifest, feeds, wanted, lambda f: self.backend.infer(f, timeout_s)
        )


async def answer(
    manifest: Manifest,
    feeds: dict[str, np.ndarray],
    wanted: Sequence[str],
    run: Callable[[dict[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]],
) -> dict[str, np.ndarray]:
    """One request, whatever the protocol: the requested outputs, or InferError."""
    names = pick_outputs(manifest, wanted)
    check_inputs(manifest, feeds)
    try:
        outputs = await run(feeds)
    except Exception as exc:
        raise classify(exc) from None
    return {n: outputs[n] for n in names}


def model_metadata(manifest: Manifest, name: str) -> dict[str, Any]:
    """The protocol's model metadata (the same fields over gRPC and REST)."""
    return {
        "name": name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": tensor_metadata(manifest, manifest.inputs),
        "outputs": tensor_metadata(manifest, manifest.outputs),
    }


async def serve(
    ingress: Ingress,
    listen: str,
    *,
    tls: Any = None,
    max_message: int = 64 << 20,
    on_ready: Any = None,
) -> None:
    """Serve `ingress` (with server reflection and grpc.health.v1) until SIGTERM or SIGINT;
    then refuse new requests, let those in flight finish (30 s at most) and stop."""
    import signal

    import grpc
    from grpc_health.v1 import _async as health_aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from lamc.runtime.security import listen_on, server_options

    server = grpc.aio.server(options=server_options(max_message))
    server.add_generic_rpc_handlers((ingress.handlers(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # The health service's descriptor joins the protocol's in lamc's pool, so that
    # reflection describes both.
    try:
        POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(health_pb2.DESCRIPTOR.serialized_pb))
    reflection.enable_server_reflection(
        (
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
        pool=POOL,
    )
    listen_on(server, listen, tls)
    await server.start()
    status = health_pb2.HealthCheckResponse
    await health.set("", status.SERVING)
    await health.set(SERVICE, status.SERVING)
    if on_ready is not None:
        on_ready()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    ingress.draining = True
    await health.set("", status.NOT_SERVING)
    await health.set(SERVICE, status.NOT_SERVING)
    deadline = loop.time() + 30.0
    while ingress.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    await server.stop(grace=1.0)

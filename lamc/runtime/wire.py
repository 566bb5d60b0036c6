"""What travels between stages: tensors in the KServe v2 style (name, datatype, shape, raw
bytes), plus the codec a link uses, and the few messages of lamc's stage service.

The message classes are built from a descriptor at import time (no protoc step, no
generated code to keep in step with the protobuf runtime). Servers parse nothing but these
messages, and tensors become numpy arrays only through `decode`, checked against the
manifest: there is no pickle anywhere on the wire.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from lamc.codecs import CODECS
from lamc.dims import eval_dim
from lamc.manifest import Manifest

SERVICE = "lamc.v1.Stage"
PACKAGE = "lamc.v1"

# KServe v2 datatype names <-> numpy.
DATATYPES = {
    "FP32": "float32",
    "FP16": "float16",
    "FP64": "float64",
    "INT64": "int64",
    "INT32": "int32",
    "INT16": "int16",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}

_T = descriptor_pb2.FieldDescriptorProto


def _messages() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(
        name="lamc/v1/stage.proto", package=PACKAGE, syntax="proto3"
    )

    def message(name: str, fields: list[tuple[str, int, int, int, str | None]]) -> None:
        proto = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            entry = proto.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                entry.type_name = type_name

    one, many = _T.LABEL_OPTIONAL, _T.LABEL_REPEATED
    message(
        "Tensor",
        [
            ("name", 1, _T.TYPE_STRING, one, None),
            ("datatype", 2, _T.TYPE_STRING, one, None),  # the tensor's dtype in the manifest
            ("shape", 3, _T.TYPE_INT64, many, None),
            ("raw", 4, _T.TYPE_BYTES, one, None),  # the encoded contents
            ("codec", 5, _T.TYPE_STRING, one, None),  # raw | fp16 | int8
            ("scale", 6, _T.TYPE_FLOAT, one, None),  # int8: value = code * scale
        ],
    )
    message(
        "SubmitRequest",
        [
            ("request_id", 1, _T.TYPE_STRING, one, None),
            ("client_id", 2, _T.TYPE_STRING, one, None),
            ("timeout_ms", 3, _T.TYPE_DOUBLE, one, None),  # the time left, at sending
            ("tensors", 4, _T.TYPE_MESSAGE, many, f".{PACKAGE}.Tensor"),
            ("sequence_id", 5, _T.TYPE_STRING, one, None),  # decoders: whose KV cache
            ("attempt", 6, _T.TYPE_INT32, one, None),
            ("position", 7, _T.TYPE_INT64, one, None),  # tokens the stages hold cached
            ("end", 8, _T.TYPE_BOOL, one, None),  # drop the sequence's caches after this
            ("variants", 9, _T.TYPE_STRING, many, None),  # "K:method" of each stage passed
        ],
    )
    message(
        "Ack",
        [
            ("accepted", 1, _T.TYPE_BOOL, one, None),
            ("code", 2, _T.TYPE_STRING, one, None),
            ("message", 3, _T.TYPE_STRING, one, None),
        ],
    )
    # A client subscribes with its secret; its requests carry client_id_of(secret), so
    # knowing a client's id (every stage sees it) does not let anyone receive its answers.
    message("SubscribeRequest", [("client_secret", 2, _T.TYPE_STRING, one, None)])
    message(
        "Delivery",
        [
            ("request_id", 1, _T.TYPE_STRING, one, None),
            ("tensors", 2, _T.TYPE_MESSAGE, many, f".{PACKAGE}.Tensor"),
            ("error", 3, _T.TYPE_STRING, one, None),
            ("stage", 4, _T.TYPE_INT32, one, None),
            ("where", 5, _T.TYPE_STRING, one, None),  # the stage's address
            ("retryable", 6, _T.TYPE_BOOL, one, None),
            ("variants", 7, _T.TYPE_STRING, many, None),  # which build of each stage answered
            # Failed because the stage switched plans before running it: nothing applied it,
            # so a client may send it again on the new plan.
            ("replanned", 8, _T.TYPE_BOOL, one, None),
        ],
    )
    message("StatusRequest", [("request_id", 1, _T.TYPE_STRING, one, None)])
    message(
        "StatusReply",
        [
            ("state", 1, _T.TYPE_STRING, one, None),
            ("detail", 2, _T.TYPE_STRING, one, None),
            ("stage", 3, _T.TYPE_INT32, one, None),
            # For an empty request id: the stage's load (`Ledger.residence_p95_ms`).
            ("in_flight", 4, _T.TYPE_INT32, one, None),
            ("residence_p95_ms", 5, _T.TYPE_DOUBLE, one, None),
            # The engine's time per hop and the hand-off to the next stage (encode, send,
            # the next stage's checks and its acknowledgement), over the last `timed` hops.
            ("compute_ms", 6, _T.TYPE_DOUBLE, many, None),
            ("handoff_ms", 7, _T.TYPE_DOUBLE, many, None),
        ],
    )
    message("ResetRequest", [("sequence_id", 1, _T.TYPE_STRING, one, None)])
    # Switch a stage server to stage `stage` of the failover plan made for losing `lost`
    # (empty: the primary plan), handing on to `next_address`.
    message(
        "ReconfigureRequest",
        [
            ("lost", 1, _T.TYPE_STRING, many, None),
            ("stage", 2, _T.TYPE_INT32, one, None),
            ("next_address", 3, _T.TYPE_STRING, one, None),
        ],
    )
    message(
        "ReconfigureReply",
        [
            ("ok", 1, _T.TYPE_BOOL, one, None),
            ("code", 2, _T.TYPE_STRING, one, None),
            ("message", 3, _T.TYPE_STRING, one, None),
            ("stage", 4, _T.TYPE_INT32, one, None),
            ("load_ms", 5, _T.TYPE_DOUBLE, one, None),
            ("mapped_bytes", 6, _T.TYPE_INT64, one, None),  # weights mapped anew
            ("reused_bytes", 7, _T.TYPE_INT64, one, None),  # weights already held
        ],
    )
    # Switch this stage to its variant built with `method` (empty: the plan's own build).
    message("VariantRequest", [("method", 1, _T.TYPE_STRING, one, None)])
    # `lamc control`: the plan the stage servers run now (the devices lost; `epoch` counts
    # the switches so far), for clients that follow the controller.
    message("PlanRequest", [])
    message(
        "PlanReply",
        [
            ("lost", 1, _T.TYPE_STRING, many, None),
            ("epoch", 2, _T.TYPE_INT32, one, None),
            ("ok", 3, _T.TYPE_BOOL, one, None),
            ("message", 4, _T.TYPE_STRING, one, None),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    names = [
        "Tensor",
        "SubmitRequest",
        "Ack",
        "SubscribeRequest",
        "Delivery",
        "StatusRequest",
        "StatusReply",
        "ResetRequest",
        "ReconfigureRequest",
        "ReconfigureReply",
        "VariantRequest",
        "PlanRequest",
        "PlanReply",
    ]
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in names
    }


_CLASSES = _messages()
Tensor = _CLASSES["Tensor"]
SubmitRequest = _CLASSES["SubmitRequest"]
Ack = _CLASSES["Ack"]
SubscribeRequest = _CLASSES["SubscribeRequest"]
Delivery = _CLASSES["Delivery"]
StatusRequest = _CLASSES["StatusRequest"]
StatusReply = _CLASSES["StatusReply"]
ResetRequest = _CLASSES["ResetRequest"]
ReconfigureRequest = _CLASSES["ReconfigureRequest"]
ReconfigureReply = _CLASSES["ReconfigureReply"]
VariantRequest = _CLASSES["VariantRequest"]
PlanRequest = _CLASSES["PlanRequest"]
PlanReply = _CLASSES["PlanReply"]
CONTROL_SERVICE = "lamc.v1.Control"


def client_id_of(secret: str) -> str:
    """The public id of a client: what its requests carry and its answers are sent to."""
    import hashlib

    return hashlib.sha256(secret.encode()).hexdigest()[:32]


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


# ---------------------------------------------------------------------------------- codecs


def encode(name: str, array: np.ndarray, codec: str = "raw") -> Any:
    """A tensor for the wire. Lossy codecs apply to floating-point tensors only; integer
    and boolean tensors (token ids, masks, shapes) always travel raw."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    array = np.require(array, requirements="C")  # 0-d stays 0-d (a shape's value)
    datatype = NUMPY_TO_DATATYPE.get(array.dtype.name)
    if datatype is None:
        raise ValueError(f"{name}: dtype {array.dtype} cannot travel between stages")
    message = Tensor(name=name, datatype=datatype, shape=list(array.shape), codec="raw")
    floating = array.dtype.kind == "f"
    if codec == "fp16" and floating:
        message.raw = array.astype(np.float16).tobytes()
        message.codec = "fp16"
    elif codec == "int8" and floating:
        peak = float(np.max(np.abs(array))) if array.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        message.raw = np.clip(np.rint(array / scale), -127, 127).astype(np.int8).tobytes()
        message.codec = "int8"
        message.scale = scale
    else:
        message.raw = array.tobytes()
    return message


def decode(message: Any) -> np.ndarray:
    """A wire tensor back to numpy, in its original dtype (lossy codecs decoded)."""
    dtype = DATATYPES.get(message.datatype)
    if dtype is None:
        raise ValueError(f"{message.name}: unknown datatype {message.datatype!r}")
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{message.name}: negative dimension in {list(shape)}")
    count = math.prod(shape)  # Python integers: a huge shape cannot wrap around
    codec = message.codec or "raw"
    wire_dtype = {
        "raw": np.dtype(dtype),
        "fp16": np.dtype(np.float16),
        "int8": np.dtype(np.int8),
    }.get(codec)
    if wire_dtype is None:
        raise ValueError(f"{message.name}: unknown codec {codec!r}")
    if len(message.raw) != count * wire_dtype.itemsize:
        raise ValueError(
            f"{message.name}: expected {count * wire_dtype.itemsize} bytes for {message.datatype}{list(shape)} ({codec}), got {len(message.raw)}"
        )
    values = np.frombuffer(message.raw, dtype=wire_dtype).reshape(shape)
    if codec == "fp16":
        return values.astype(dtype)
    if codec == "int8":
        return (values.astype(np.float32) * np.float32(message.scale)).astype(dtype)
    return values


def roundtrip(array: np.ndarray, codec: str) -> np.ndarray:
    """What the next stage receives when `array` crosses a link with `codec` (the
    in-process executor applies the same loss, so `lamc validate` measures it)."""
    if codec == "raw" or array.dtype.kind != "f":
        return array
    return decode(encode("t", array, codec))


def max_message_bytes(manifest: Manifest) -> int:
    """gRPC's message limit for this pipeline: the largest set of tensors crossing one
    boundary at the dims' maximum sizes, plus room for framing (at most 2 GiB - 1)."""
    largest_dims = {name: bounds.max for name, bounds in manifest.dims.items()}
    largest = 0
    for edge in manifest.edges:
        total = 0
        for tensor in edge.tensors:
            spec = manifest.tensors[tensor.name]
            try:
                count = int(np.prod([eval_dim(d, largest_dims) for d in spec.shape]))
            except ValueError:
                count = 0
            total += count * np.dtype(spec.dtype).itemsize
        largest = max(largest, total)
    return int(min(largest * 1.05 + (4 << 20), 2**31 - 1))

"""Link codecs: how activations travel between stages, defined once.

`raw` sends tensors as they are; `fp16` and `int8` are lossy codecs for floating-point
tensors (integers always travel raw). The planner moves encoded bytes over links; the
runtime (`lamc.runtime.wire`) encodes and decodes. `auto` is a compile-time choice, not a
codec: the smallest lossy codec per edge within the accuracy budget.
"""

from __future__ import annotations

RAW = "raw"
CODECS = (RAW, "fp16", "int8")
LOSSY_CODECS = ("int8", "fp16")  # most compressive first: what `auto` tries, in order
CHOICES = (*CODECS, "auto")  # what --codec accepts

# Floating-point item sizes by numpy and ONNX IR dtype names (lossy codecs apply to these).
_FLOAT_ITEMSIZE = {"float32": 4, "float": 4, "float16": 2, "float64": 8, "double": 8, "bfloat16": 2}


def encoded_bytes(nbytes: float, dtype: str, codec: str) -> float:
    """Bytes on the wire for a tensor of `nbytes` in `dtype` (numpy or IR name) under `codec`."""
    itemsize = _FLOAT_ITEMSIZE.get(dtype.lower())
    if itemsize is None or codec not in LOSSY_CODECS:
        return nbytes
    return nbytes * min(itemsize, 2 if codec == "fp16" else 1) / itemsize

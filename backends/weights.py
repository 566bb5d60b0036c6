"""The artifact's shared weight files (`OUT/weights/`): every stage of every plan names its
weights there, each distinct tensor stored once."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx_ir as ir

from lamc.backends.slice import raw_bytes
from lamc.manifest import ArtifactFile, WeightRef

# The loader maps a shared file whole, so a tensor only needs an offset its dtype and the
# runtime's vector loads like (a cache line).
SHARED_ALIGNMENT = 64
# Dtypes the shared weight files hold: those numpy (and so the loader) can map directly.
SHARED_DTYPES = {
    "float64", "float32", "float16",
    "int64", "int32", "int16", "int8",
    "uint64", "uint32", "uint16", "uint8", "bool",
}  # fmt: skip


class SharedWeights:
    """`OUT/weights/`: the weights of every stage of every plan, one file per unit and
    precision (`u0007.fp32.bin`), each distinct tensor stored once (by name and content)
    and aligned for memory mapping. Files are append-only and hashed as they grow."""

    def __init__(self, out_dir: Path) -> None:
        self.root = out_dir
        self.directory = out_dir / "weights"
        self._files: dict[str, tuple[Any, Any, int]] = {}  # path -> (handle, digest, size)
        self._stored: dict[tuple[str, str], WeightRef] = {}

    def put(self, value: ir.Value, unit: str, precision: str) -> WeightRef | None:
        """Store `value` (or find it stored); None when its dtype stays with the stage."""
        tensor = value.const_value
        assert tensor is not None
        try:
            dtype = tensor.dtype.numpy().name
        except TypeError:
            return None
        if dtype not in SHARED_DTYPES or tensor.dtype.bitwidth < 8:
            return None
        raw = raw_bytes(value)
        key = (value.name or "", hashlib.sha256(raw).hexdigest())
        known = self._stored.get(key)
        if known is not None:
            return known
        path = f"weights/{unit}.{precision}.bin"
        if path not in self._files:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / path, "wb")  # noqa: SIM115 - closed by finish()
            self._files[path] = (handle, hashlib.sha256(), 0)
        handle, digest, size = self._files[path]
        padding = (-size) % SHARED_ALIGNMENT
        if padding:
            handle.write(b"\0" * padding)
            digest.update(b"\0" * padding)
        offset = size + padding
        handle.write(raw)
        digest.update(raw)
        self._files[path] = (handle, digest, offset + len(raw))
        shape = tuple(int(d) for d in tensor.shape.numpy())
        ref = WeightRef(key[0], path, offset, len(raw), dtype, shape)
        self._stored[key] = ref
        return ref

    def flush(self) -> None:
        for handle, _, _ in self._files.values():
            handle.flush()

    def files(self) -> dict[str, ArtifactFile]:
        """Every weight file so far, with its size and hash (files stay open to grow)."""
        self.flush()
        return {
            path: ArtifactFile(path, digest.copy().hexdigest(), size)
            for path, (_, digest, size) in self._files.items()
        }

    def close(self) -> None:
        for handle, _, _ in self._files.values():
            handle.close()

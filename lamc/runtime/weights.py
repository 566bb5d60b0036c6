"""Shared weights, memory-mapped: every stage of every plan in an artifact names its
weights by file, offset, length, dtype and shape (`StageSpec.weights`); this maps each
file once per process and hands out zero-copy views. A stage server that switches to
another plan's stage reuses the mappings it holds (and the pages the OS has in memory):
only the weights it did not have are read from disk."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from lamc.errors import IntegrityError


class WeightLike(Protocol):
    """A weight as the manifest lists it (`lamc.manifest.WeightRef`, or the early start's
    reading of the same fields, `lamc.runtime.early.Weight`)."""

    @property
    def name(self) -> str: ...
    @property
    def file(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


_LOCK = threading.Lock()
# (resolved path, size, mtime_ns) -> the whole file, mapped read-only.
_MAPPED: dict[tuple[str, int, int], np.memmap] = {}


def _mapping(path: Path) -> np.memmap:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        mapped = _MAPPED.get(key)
        if mapped is None:
            mapped = np.memmap(path, dtype=np.uint8, mode="r")
            _MAPPED[key] = mapped
        return mapped


def map_weights(out_dir: Path, refs: Iterable[WeightLike]) -> dict[str, np.ndarray]:
    """name -> a read-only array viewing the bytes of `out_dir/ref.file` (no copy)."""
    arrays: dict[str, np.ndarray] = {}
    for ref in refs:
        path = out_dir / ref.file
        try:
            mapped = _mapping(path)
        except OSError as exc:
            raise IntegrityError(f"{ref.file}: cannot map ({exc.strerror or exc})") from None
        if ref.offset + ref.length > mapped.size:
            raise IntegrityError(f"{ref.file}: {ref.name} lies past the end of the file")
        raw = mapped[ref.offset : ref.offset + ref.length]
        arrays[ref.name] = raw.view(np.dtype(ref.dtype)).reshape(ref.shape)
    return arrays


def mapped_files() -> Mapping[tuple[str, int, int], np.memmap]:
    """The files this process has mapped (for tests and reports)."""
    return dict(_MAPPED)

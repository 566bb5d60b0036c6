"""Paths an artifact names, checked before anything is opened: kept free of heavy imports,
so a stage server can check its stage's files before the rest of lamc is imported."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

from lamc.errors import IntegrityError


def safe_path(root: Path, relative: str, what: str) -> Path:
    """`root/relative`, refusing absolute paths, `..`, and symlinks at any level."""
    if (
        not relative
        or relative.startswith(("/", "\\"))
        or os.path.isabs(relative)
        or "\\" in relative
    ):
        raise IntegrityError(f"{what}: path {relative!r} is not a plain relative path")
    parts = Path(relative).parts
    if ".." in parts or "." in parts:
        raise IntegrityError(f"{what}: path {relative!r} leaves or re-enters its directory")
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise IntegrityError(f"{what}: {current.relative_to(root)} is a symlink")
    resolved = current.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise IntegrityError(f"{what}: path {relative!r} points outside {root}")
    return current


def sha256_file(path: Path) -> str:
    """The file's sha256, hashed from a read-only mapping (no copy into Python buffers;
    the hashing releases the GIL), or read in blocks where the file cannot be mapped."""
    with path.open("rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return hashlib.sha256(mapped).hexdigest()
        except (ValueError, OSError):  # empty, or a file system without mappings
            digest = hashlib.sha256()
            f.seek(0)
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
            return digest.hexdigest()

"""Weight files a stage server hashed at an earlier start are not hashed again while they
are unchanged; any write to one (its ctime moves) has it hashed again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamc.manifest import ArtifactFile
from lamc.paths import sha256_file
from lamc.runtime import stamps


def _artifact(out: Path, name: str, data: bytes) -> ArtifactFile:
    path = out / name
    path.write_bytes(data)
    return ArtifactFile(path=name, sha256=sha256_file(path), size=len(data))


def test_recorded_files_are_trusted_until_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LAMC_REVERIFY", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    a, b = _artifact(out, "a.bin", b"a" * 4096), _artifact(out, "b.bin", b"b" * 4096)
    assert stamps.unverified(out, [a, b]) == [a, b]  # nothing recorded yet
    stamps.record(out, [a, b])
    assert stamps.unverified(out, [a, b]) == []
    # A byte changed in place, with the old modification time put back: ctime still moves.
    info = (out / "a.bin").stat()
    with (out / "a.bin").open("r+b") as handle:
        handle.write(b"X")
    os.utime(out / "a.bin", ns=(info.st_atime_ns, info.st_mtime_ns))
    assert stamps.unverified(out, [a, b]) == [a]
    # A manifest that now expects another hash of an unchanged file: hashed again.
    other = ArtifactFile(path="b.bin", sha256="0" * 64, size=4096)
    assert stamps.unverified(out, [other]) == [other]
    # Forced, or with an unreadable record: everything.
    monkeypatch.setenv("LAMC_REVERIFY", "1")
    assert stamps.unverified(out, [b]) == [b]
    monkeypatch.delenv("LAMC_REVERIFY")
    store = next((tmp_path / "cache" / "lamc" / "verified").iterdir())
    store.write_text("{not json")
    assert stamps.unverified(out, [b]) == [b]


def test_a_stage_server_rehashes_a_tampered_weight_after_a_recorded_start(
    tmp_path: Path,
) -> None:
    """The second start of an unchanged stage hashes nothing; after a weight file is
    edited (its size and modification time kept), the start hashes it and refuses."""
    from lamc.errors import IntegrityError
    from lamc.runtime.loading import StageLoad
    from tests.compiled import compile_zoo

    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    old = {k: os.environ.get(k) for k in (*env, "LAMC_REVERIFY")}
    os.environ.update(env)
    os.environ.pop("LAMC_REVERIFY", None)
    try:
        out = tmp_path / "gpt2"
        compile_zoo("zoo:gpt2:test", out, 2)
        first = StageLoad(out, 1)
        first.session.result()
        first.hashed.result()
        assert first.rehashed == len(first.weights) > 0
        second = StageLoad(out, 1)
        second.session.result()
        second.hashed.result()
        assert second.rehashed == 0
        weight = out / second.weights[0].path
        info = weight.stat()
        with weight.open("r+b") as handle:
            handle.seek(info.st_size // 2)
            byte = handle.read(1)
            handle.seek(info.st_size // 2)
            handle.write(bytes([byte[0] ^ 0xFF]))
        os.utime(weight, ns=(info.st_atime_ns, info.st_mtime_ns))
        third = StageLoad(out, 1)
        with pytest.raises(IntegrityError, match="modified"):
            third.hashed.result()
        assert third.rehashed == 1
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

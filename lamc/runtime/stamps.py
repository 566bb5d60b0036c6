"""Weight files a stage server has already hashed, so that a restart on the same device
does not hash them again (as a container runtime checks an image's digests when it
pulls it, not at every start).

After a start whose weight files all matched their sha256, the server records, per file,
the hash it matched and the file's identity: device, inode, size, and the modification
and change times in nanoseconds. At the next start a file whose identity is unchanged
and whose manifest still asks for that hash is taken as verified. Writing to a file, or
replacing it, changes its change time (ctime), which only the kernel sets; such a file is
hashed again. `LAMC_REVERIFY=1` hashes every file at every start.

The records live in `$XDG_CACHE_HOME/lamc/verified/` (`~/.cache/lamc/verified/`), one
file per output directory. A record that cannot be read or written is ignored: the files
are then hashed, as without records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from lamc.manifest import ArtifactFile


def _store(out_dir: Path) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    key = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:32]
    return Path(base) / "lamc" / "verified" / f"{key}.json"


def _identity(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def unverified(out_dir: Path, files: Sequence[ArtifactFile]) -> list[ArtifactFile]:
    """The files that still need hashing: all with LAMC_REVERIFY=1, else those with no
    record for their expected hash and their current identity."""
    if os.environ.get("LAMC_REVERIFY", "") not in ("", "0"):
        return list(files)
    try:
        records = json.loads(_store(out_dir).read_text())
    except (OSError, ValueError):
        return list(files)
    if not isinstance(records, dict):
        return list(files)
    left = []
    for item in files:
        record = records.get(item.path)
        try:
            same = (
                isinstance(record, list)
                and len(record) == 2
                and record[0] == item.sha256
                and record[1] == _identity(out_dir / item.path)
            )
        except OSError:
            same = False
        if not same:
            left.append(item)
    return left


def record(out_dir: Path, files: Sequence[ArtifactFile]) -> None:
    """Remember that `files` (just hashed, or found recorded) matched their hashes."""
    with contextlib.suppress(OSError, ValueError):
        store = _store(out_dir)
        store.parent.mkdir(parents=True, exist_ok=True)
        try:
            records = json.loads(store.read_text())
            if not isinstance(records, dict):
                records = {}
        except (OSError, ValueError):
            records = {}
        for item in files:
            records[item.path] = [item.sha256, _identity(out_dir / item.path)]
        tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(records, sort_keys=True))
        os.replace(tmp, store)

"""Atomic output directories: build beside OUT, then swap it into place.

A compile writes into a hidden sibling (`.OUT.lamc-XXXX/`), puts the manifest in last,
and only then replaces OUT: on Linux in one `renameat2(RENAME_EXCHANGE)`, so a reader sees
either the old OUT or the new one, never a mix. A compile that fails or is interrupted
removes its temporary directory and leaves the previous OUT as it was; one killed outright
(SIGKILL) leaves the temporary directory behind, and the next compile beside it removes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lamc.errors import UsageError

MARKER = ".lamc-building"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextlib.contextmanager
def atomic_directory(out: Path, *, owner_file: str = "manifest.json") -> Iterator[Path]:
    """Yield a fresh directory; on success it replaces `out` atomically."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / owner_file).is_file():
        raise UsageError(
            f"{out} exists, is not empty and holds no {owner_file}: refusing to replace it",
            hint="choose another -o OUT or remove it",
        )
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, out.name)
    # The owner's pid is in the name, so that a compile killed at any instant (even before
    # it wrote a file) leaves a directory the next one can tell is stale.
    prefix = f".{out.name}.lamc-{os.getpid()}-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        # mkdtemp makes the directory private; OUT gets the usual permissions (umask applied).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        (tmp / MARKER).write_text(str(os.getpid()))
    except BaseException:
        # Interrupted while the directory was being made (a SIGTERM can land anywhere):
        # remove what this process made, found by the pid in its name.
        for made in parent.glob(f"{glob.escape(prefix)}*"):
            shutil.rmtree(made, ignore_errors=True)
        raise
    try:
        yield tmp
        # The marker stays until the swap: a compile killed before it leaves a directory
        # the next compile recognises as stale and removes.
        _publish(tmp, out)
        (out / MARKER).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file beside `path` with `write(tmp)`, then rename it into place: a reader
    sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def check_writable(out: Path) -> None:
    """Fail before any work when OUT cannot be written (exit 2), not after the compile."""
    ancestor = out.parent.resolve() if out.parent != Path("") else Path.cwd()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"-o {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"-o {out}: cannot write in {ancestor} (permission denied)")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"-o {out}: cannot replace it (permission denied)")


# A temporary directory without a marker is one whose swap was cut short (it holds the
# previous OUT, or a finished one) once it is older than this.
STALE_AFTER_S = 60.0


def clean_stale(parent: Path, name: str) -> list[Path]:
    """Remove temporary directories of compiles of `name` whose process is gone, and those
    left without a marker by a compile killed during its swap."""
    import time

    removed = []
    for candidate in parent.glob(f".{name}.lamc-*"):
        owner = re.match(rf"^\.{re.escape(name)}\.lamc-(?:old-)?(\d+)(?:-|$)", candidate.name)
        if owner is not None:
            pid = int(owner.group(1))
            if pid != os.getpid() and not alive(pid):
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
            continue
        marker = candidate / MARKER
        try:
            pid = int(marker.read_text().strip())
        except FileNotFoundError:
            try:
                age = time.time() - candidate.stat().st_mtime
            except OSError:
                continue
            stale = age > STALE_AFTER_S
        except (OSError, ValueError):
            continue
        else:
            stale = pid != os.getpid() and not alive(pid)
        if stale:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous OUT
        return
    old = out.with_name(f".{out.name}.lamc-old-{os.getpid()}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(result == 0)

"""`lamc bundle OUT --device NAME -o DIR`: what one device needs of a compiled artifact.

A bundle holds the stage graphs and weight files of every stage the device runs, in the
primary plan and in every failover plan, and a manifest of its own: the artifact's, with
`bundle` naming the device. It verifies on its own (`lamc serve DIR --stage K` hashes the
files it loads; a reconfigure to another plan finds the files it needs there), so a device
is shipped only its share, not every device's weights.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from lamc.atomic import atomic_directory, check_writable
from lamc.errors import UsageError
from lamc.paths import safe_path
from lamc.verify import verify


@dataclass(frozen=True)
class Bundle:
    device: str
    files: int
    bytes: int
    artifact_bytes: int
    roles: tuple[tuple[str, int], ...]  # (plan label, the device's stage index in it)


def bundle(out: Path, device: str, target: Path) -> Bundle:
    """Write device `device`'s bundle of the compiled artifact `out` to `target`
    (atomically: a failure leaves `target` as it was)."""
    if target.resolve() == out.resolve():
        raise UsageError(f"-o {target}: the bundle cannot replace the artifact it comes from")
    check_writable(target)
    manifest = verify(out)  # every file of every plan hashed before anything is copied
    if manifest.bundle is not None:
        raise UsageError(
            f"{out} is already the bundle of {manifest.bundle}",
            hint="bundle the whole compiled artifact",
        )
    roles = tuple(
        (label, stage.index)
        for label, stages, _ in manifest.pipelines()
        for stage in stages
        if any(m.device == device for m in stage.members)  # a replicated stage's members too
    )
    if not roles:
        running = sorted(
            {m.device for _, stages, _ in manifest.pipelines() for s in stages for m in s.members}
        )
        raise UsageError(
            f"--device {device}: it runs no stage in any plan of {out}",
            hint=f"devices with stages: {', '.join(running)}",
        )
    files = manifest.files(device)
    with atomic_directory(target) as tmp:
        for item in files.values():
            source = safe_path(out, item.path, "files")
            copy = tmp / item.path
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
        (tmp / "manifest.json").write_text(replace(manifest, bundle=device).to_json())
        verify(tmp)  # the bundle verifies on its own before it replaces `target`
    return Bundle(
        device=device,
        files=len(files),
        bytes=sum(f.size for f in files.values()),
        artifact_bytes=manifest.total_bytes(),
        roles=roles,
    )

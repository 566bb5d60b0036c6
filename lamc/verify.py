"""Reading and verifying a compiled pipeline: the executor trusts nothing before `verify`
passes: the JSON Schema shipped in `lamc/schemas`, the version, the manifest's agreement
with itself (`lamc.integrity`), and for every artifact a safe relative path (no `..`, no
absolute path, no symlink anywhere on it), its size and its sha256. This module imports
only the standard library and jsonschema (called only to name what is wrong with a
manifest `lamc.schemacheck` refuses): it runs on the edge.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from lamc.errors import IntegrityError, RuntimeEnvironmentError, UsageError
from lamc.integrity import check_consistency, check_requires, check_unlisted
from lamc.manifest import FILENAME, MIN_ONNXRUNTIME, VERSION, ArtifactFile, Manifest
from lamc.paths import safe_path, sha256_file


def schema() -> dict[str, Any]:
    # A plain path, not importlib.resources (whose import alone is a tenth of a stage
    # server's start-up imports): lamc installs as files, never zipped.
    text = (Path(__file__).parent / "schemas" / "manifest.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def schema_errors(data: Any) -> list[Any]:
    """Every way `data` breaks the manifest schema, by jsonschema, in document order."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    return sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))


@functools.cache
def _valid() -> Callable[[Any], bool]:
    from lamc.schemacheck import compile_schema

    return compile_schema(schema())


def files_sha256(files: Iterable[Path]) -> str:
    """One sha256 over several files, in the order given: each file's name, then its
    bytes (a checkpoint directory's or an adapter's files, pinned in the manifest)."""
    total = hashlib.sha256()
    for file in files:
        total.update(file.name.encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                total.update(block)
    return total.hexdigest()


def read_manifest(out_dir: Path) -> Manifest:
    """Parse and schema-check `OUT/manifest.json` (no artifact checks)."""
    path = out_dir / FILENAME
    if not out_dir.is_dir():
        raise IntegrityError(f"{out_dir} is not a directory holding a compiled pipeline")
    if path.is_symlink():
        raise IntegrityError(f"{path} is a symlink")
    if not path.is_file():
        raise IntegrityError(
            f"{path} is missing: {out_dir} is not a compiled pipeline (or was not finished)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise IntegrityError(f"{path}: not valid JSON (nested too deep)") from None
    except ValueError as exc:  # an integer of thousands of digits, among others
        raise IntegrityError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict) or data.get("lamc_manifest") != VERSION:
        version = data.get("lamc_manifest") if isinstance(data, dict) else None
        raise IntegrityError(
            f"{path}: lamc_manifest is {version!r}; this executor reads version {VERSION}"
        )
    # The compiled check answers yes or no quickly; jsonschema says what is wrong.
    # jsonschema is the reference: were the two ever to disagree, it decides.
    errors = schema_errors(data) if not _valid()(data) else []
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise IntegrityError(f"{path}: {where}: {first.message}")
    manifest = Manifest.from_dict(data)
    check_consistency(manifest, path)
    return manifest


def verify(
    out_dir: Path,
    stage: int | None = None,
    without: Sequence[str] = (),
    later: list[ArtifactFile] | None = None,
) -> Manifest:
    """Everything the executor checks before it loads anything. Raises IntegrityError
    (exit 9) naming the file, or RuntimeEnvironmentError (exit 10) for a runtime too old.

    The manifest is always checked whole; with `stage`, only the files that stage loads
    are hashed (a stage server starts without reading every other stage's weights), of
    the failover plan for losing `without` when given (the manifest returned is still the
    whole one).

    `later`: a list to take the shared weight files (raw tensor bytes, which nothing parses)
    whose size is checked now and whose hash the caller checks itself, alongside loading
    the stage, before it serves anything. Every file that is parsed (manifest, stage
    graphs) is hashed here, before anything loads."""
    manifest = read_manifest(out_dir)
    _check_runtime(manifest)
    check_unlisted(out_dir, manifest)
    plan = manifest.without(without) if without else manifest
    if stage is not None and not 0 <= stage < len(plan.stages):
        raise UsageError(f"--stage {stage}: the pipeline has stages 0..{len(plan.stages) - 1}")
    # Every file of every plan, once (shared weight files are listed by each stage using them).
    if stage is not None and manifest.bundle not in (None, plan.stages[stage].device):
        raise UsageError(
            f"--stage {stage} runs on {plan.stages[stage].device}; this bundle holds the files "
            f"of {manifest.bundle} only",
            hint="serve it from that device's bundle (lamc bundle OUT --device NAME)",
        )
    files = manifest.present() if stage is None else {f.path: f for f in plan.stages[stage].files}
    now = list(files.values())
    if later is not None:
        bulk = {w.file for w in (plan.stages[stage].weights if stage is not None else ())}
        later.extend(f for f in now if f.path in bulk)
        now = [f for f in now if f.path not in bulk]
        verify_files(out_dir, later, hash=False)
    verify_files(out_dir, now)
    return manifest


def verify_files(out_dir: Path, files: Iterable[ArtifactFile], hash: bool = True) -> None:
    """Each file is where the manifest says, of its size and hash (exit 9 otherwise);
    `hash=False`: where and of what size only."""
    for item in files:
        file = safe_path(out_dir, item.path, "files")
        if not file.is_file():
            raise IntegrityError(f"{item.path}: missing")
        size = file.stat().st_size
        if size != item.size:
            raise IntegrityError(
                f"{item.path}: size {size} bytes, the manifest says {item.size} (truncated or replaced)"
            )
        if not hash:
            continue
        digest = sha256_file(file)
        if digest != item.sha256:
            raise IntegrityError(
                f"{item.path}: sha256 {digest[:16]}..., the manifest says {item.sha256[:16]}... (modified)"
            )


def _check_runtime(manifest: Manifest) -> None:
    check_requires(manifest)
    needs_ort = any(s.backend == "onnxruntime" for s in manifest.stages)
    if not needs_ort:
        return
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeEnvironmentError(
            "onnxruntime is not installed", hint="pip install lamc"
        ) from None
    have = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if have < MIN_ONNXRUNTIME:
        raise RuntimeEnvironmentError(
            f"onnxruntime {onnxruntime.__version__} is older than {'.'.join(map(str, MIN_ONNXRUNTIME))}, which this pipeline needs"
        )

"""What the executor checks of a manifest beyond its schema, before any session loads:
the stages and tensors agree with each other, symbolic dims evaluate to real sizes, the
runtimes it requires are installed, and nothing unlisted sits beside what a session reads.
Standard library only: it runs on the edge."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from lamc.errors import IntegrityError, RuntimeEnvironmentError

if TYPE_CHECKING:
    from lamc.manifest import Edge, Manifest, StageSpec

# No tensor lamc plans has a dimension this large; an expression that reaches it is not ours.
_LARGEST_DIM = 1 << 40


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits[:9]))
    return tuple(parts)


def check_requires(manifest: Manifest) -> None:
    """`requires: {package: ">=X.Y"}`: each package installed, at that version or newer."""
    for package, spec in sorted(manifest.requires.items()):
        if not spec.startswith(">=") or not version_tuple(spec[2:]):
            raise IntegrityError(f"requires/{package}: {spec!r} is not '>=VERSION'")
        installed = installed_version(package)
        if installed is None:
            raise RuntimeEnvironmentError(
                f"this pipeline requires {package} {spec}, which is not installed",
                hint=f"pip install '{package}{spec}'",
            )
        if version_tuple(installed) < version_tuple(spec[2:]):
            raise RuntimeEnvironmentError(
                f"this pipeline requires {package} {spec}; {installed} is installed",
                hint=f"pip install '{package}{spec}'",
            )


def installed_version(package: str) -> str | None:
    """The version of `package` that imports here: its module's `__version__` (which also
    answers for a build of it installed under another name, such as onnxruntime-gpu for
    onnxruntime), else the installed distribution's; None when neither is there."""
    import importlib

    try:
        version = getattr(importlib.import_module(package.replace("-", "_")), "__version__", None)
    except ImportError:
        version = None
    if isinstance(version, str):
        return version
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_unlisted(out_dir: Path, manifest: Manifest) -> None:
    """Every file in a stage's folder is listed and hashed: a runtime loads external data
    by the name its model gives, so a file taken off the list (and edited) would be read
    unchecked. Nothing unlisted may sit beside what a session reads."""
    listed = set(manifest.present())  # a bundle holds its device's files only
    folders = {str(Path(f).parent) for f in manifest.files() if str(Path(f).parent) != "."}
    for folder in sorted(folders):
        base = out_dir / folder
        if not base.is_dir():
            continue
        for found in sorted(base.rglob("*")):
            relative = found.relative_to(out_dir).as_posix()
            if (found.is_file() or found.is_symlink()) and relative not in listed:
                raise IntegrityError(
                    f"{relative}: not in the manifest's file list (a file a session could "
                    "read unchecked)"
                )


def check_dim_expressions(manifest: Manifest, path: Path) -> None:
    """Every symbolic dim evaluates, at the dims' smallest and largest sizes, to a size a
    tensor can have: no division by zero, nothing negative or absurdly large."""
    from lamc.dims import UnresolvedDim, eval_dim

    corners = [
        {n: b.min for n, b in manifest.dims.items()},
        {n: b.max for n, b in manifest.dims.items()},
    ]
    for name, spec in manifest.tensors.items():
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, str):
                continue
            for binding in corners:
                try:
                    size = eval_dim(dim, binding)
                except UnresolvedDim:
                    break  # a name no dim of the manifest has: bound by the tensors at run time
                except (ArithmeticError, RecursionError, MemoryError, ValueError):
                    raise IntegrityError(
                        f"{path}: tensors/{name}: dim {dim[:60]!r} on axis {axis} cannot be evaluated"
                    ) from None
                if not 0 <= size <= _LARGEST_DIM:
                    raise IntegrityError(
                        f"{path}: tensors/{name}: dim {dim[:60]!r} on axis {axis} evaluates to {size}"
                    )


def check_consistency(manifest: Manifest, path: Path) -> None:
    """The manifest agrees with itself, in the primary pipeline and every failover one."""
    for name, bounds in manifest.dims.items():
        if bounds.min > bounds.max:
            raise IntegrityError(f"{path}: dims/{name}: min {bounds.min} > max {bounds.max}")
    check_dim_expressions(manifest, path)
    check_shape_values(manifest, path)
    for label, stages, edges in manifest.pipelines():
        where = path if label == "primary" else Path(f"{path} ({label})")
        _check_stages(manifest, stages, where)
        if any(s.to is not None for s in stages):
            _check_dag(manifest, stages, edges, where)
    check_variants(manifest, path)
    check_weights(manifest, path)


def check_variants(manifest: Manifest, path: Path) -> None:
    """Each variant stands in for a primary stage: same device, same tensors in and out,
    its graph among its files; the ladder's steps are 1..n, each stage on it once."""
    for k, variant in enumerate(manifest.variants):
        where = f"{path}: variants/{k}"
        if not 0 <= variant.stage < len(manifest.stages):
            raise IntegrityError(f"{where}: stage {variant.stage} is not a stage of the plan")
        base, spec = manifest.stages[variant.stage], variant.spec
        same = (spec.index, spec.device, spec.receives, spec.sends, spec.kv_cache)
        if same != (base.index, base.device, base.receives, base.sends, base.kv_cache):
            raise IntegrityError(
                f"{where}: it does not stand in for stage {variant.stage} (another device, "
                "index, tensors or KV caches)"
            )
        _check_stage(manifest, spec, Path(where))
    steps = sorted(v.step for v in manifest.variants)
    if steps != list(range(1, len(steps) + 1)):
        raise IntegrityError(f"{path}: variants: the ladder's steps are not 1..{len(steps)}")
    if len({v.stage for v in manifest.variants}) != len(manifest.variants):
        raise IntegrityError(f"{path}: variants: a stage is on the ladder twice")


def _check_stage(manifest: Manifest, stage: StageSpec, path: Path) -> None:
    for name in (*stage.inputs, *stage.outputs, *stage.receives, *stage.sends):
        if name not in manifest.tensors:
            raise IntegrityError(
                f"{path}: stages/{stage.index}: tensor {name!r} has no spec in `tensors`"
            )
    if stage.model not in {f.path for f in stage.files}:
        raise IntegrityError(
            f"{path}: stages/{stage.index}/model: {stage.model!r} is not one of the stage's files"
        )
    if stage.replicas:
        where = f"{path}: stages/{stage.index}/replicas"
        devices = [r.device for r in stage.replicas]
        if devices[0] != stage.device:
            raise IntegrityError(
                f"{where}: the first is {devices[0]!r}, not the stage's device {stage.device!r}"
            )
        if len(set(devices)) != len(devices):
            raise IntegrityError(f"{where}: a device serves the stage twice")
        total = sum(r.share for r in stage.replicas)
        if abs(total - 1.0) > 1e-3:
            raise IntegrityError(f"{where}: the shares sum to {total:.6g}, not 1")


def _check_stages(manifest: Manifest, stages: tuple[StageSpec, ...], path: Path) -> None:
    for stage in stages:
        _check_stage(manifest, stage, path)
    if [s.index for s in stages] != list(range(len(stages))):
        raise IntegrityError(f"{path}: stages are not numbered 0..{len(stages) - 1}")
    if any(s.to is not None for s in stages):
        return  # a branch-parallel pipeline: its edges are checked by _check_dag
    # Stages hand on what the next one receives: swapped or edited stages are caught here,
    # before any session loads.
    for before, after in itertools.pairwise(stages):
        if set(after.receives) - set(before.sends):
            missing = sorted(set(after.receives) - set(before.sends))
            raise IntegrityError(
                f"{path}: stages/{after.index} receives {', '.join(missing)}, which stage "
                f"{before.index} does not send"
            )


def _check_dag(
    manifest: Manifest, stages: tuple[StageSpec, ...], edges: tuple[Edge, ...], path: Path
) -> None:
    """A branch-parallel pipeline: every stage sends to a later one (the last to the
    client), and the edges deliver exactly what each stage receives, from stages that
    send it or, for model inputs, from the client."""
    n = len(stages)
    for stage in stages:
        to = stage.to
        last = stage.index == n - 1
        if to is None or not (to == n if last else stage.index < to < n):
            raise IntegrityError(
                f"{path}: stages/{stage.index}/to: {to!r}; each stage sends to a later stage, "
                f"the last (stage {n - 1}) to the client ({n})"
            )
    arriving: dict[int, set[str]] = {k: set() for k in range(n + 1)}
    for k, edge in enumerate(edges):
        where = f"{path}: edges/{k}"
        names = {t.name for t in edge.tensors}
        if not -1 <= edge.source < n or not 0 <= edge.target <= n:
            raise IntegrityError(f"{where}: {edge.source} -> {edge.target} is not between stages")
        if edge.source == -1:
            if names - set(manifest.inputs):
                extra = sorted(names - set(manifest.inputs))
                raise IntegrityError(f"{where}: the client sends {', '.join(extra)}, not inputs")
        else:
            source = stages[edge.source]
            if edge.target != source.to or names != set(source.sends):
                raise IntegrityError(
                    f"{where}: stage {edge.source} sends {sorted(source.sends)} to {source.to}, "
                    f"not {sorted(names)} to {edge.target}"
                )
        if names & arriving[edge.target]:
            twice = sorted(names & arriving[edge.target])
            raise IntegrityError(f"{where}: {', '.join(twice)} arrive at {edge.target} twice")
        arriving[edge.target] |= names
    for stage in stages:
        if arriving[stage.index] != set(stage.receives):
            raise IntegrityError(
                f"{path}: stages/{stage.index} receives {sorted(stage.receives)}, but the edges "
                f"deliver {sorted(arriving[stage.index])}"
            )
    if arriving[n] != set(manifest.outputs):
        raise IntegrityError(f"{path}: the edges to the client do not carry the model's outputs")


def check_shape_values(manifest: Manifest, path: Path) -> None:
    """A recorded shape-tensor value fits its tensor (static shape, one element per entry)
    and each entry evaluates, at the dims' smallest and largest sizes, to a bounded int."""
    from lamc.dims import UnresolvedDim, eval_dim

    corners = [
        {n: b.min for n, b in manifest.dims.items()},
        {n: b.max for n, b in manifest.dims.items()},
    ]
    for name, spec in manifest.tensors.items():
        if spec.value is None:
            continue
        where = f"{path}: tensors/{name}/value"
        if "int" not in spec.dtype:
            raise IntegrityError(f"{where}: only integer tensors carry a value ({spec.dtype})")
        if not all(isinstance(d, int) for d in spec.shape):
            raise IntegrityError(f"{where}: the tensor's shape is not static")
        size = 1
        for d in spec.shape:
            size *= int(d)
        if size != len(spec.value):
            raise IntegrityError(f"{where}: {len(spec.value)} entries for {size} elements")
        for entry in spec.value:
            for binding in corners:
                try:
                    number = eval_dim(entry, binding)
                except (UnresolvedDim, ArithmeticError, RecursionError, MemoryError, ValueError):
                    raise IntegrityError(
                        f"{where}: {str(entry)[:60]!r} cannot be evaluated with the manifest's dims"
                    ) from None
                if abs(number) > _LARGEST_DIM:
                    raise IntegrityError(f"{where}: {str(entry)[:60]!r} evaluates to {number}")


_ITEMSIZE = {
    "float64": 8, "int64": 8, "uint64": 8,
    "float32": 4, "int32": 4, "uint32": 4,
    "float16": 2, "int16": 2, "uint16": 2,
    "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip


def check_weights(manifest: Manifest, path: Path) -> None:
    """Every shared weight lies inside a file its stage lists, with the size its dtype and
    shape give; a file listed by several stages is the same file (size and hash) in all."""
    listed: dict[str, tuple[int, str, int]] = {}
    every = [stage for _, stages, _ in manifest.pipelines() for stage in stages]
    every += [v.spec for v in manifest.variants]
    for stage in every:
        files = {f.path: f for f in stage.files}
        for f in stage.files:
            seen = listed.setdefault(f.path, (f.size, f.sha256, stage.index))
            if seen[:2] != (f.size, f.sha256):
                raise IntegrityError(
                    f"{path}: {f.path}: stage {stage.index} and stage {seen[2]} list it "
                    "with different sizes or hashes"
                )
        for ref in stage.weights:
            where = f"{path}: stages/{stage.index}/weights/{ref.name[:80]}"
            if ref.file not in files:
                raise IntegrityError(f"{where}: {ref.file} is not one of the stage's files")
            count = 1
            for d in ref.shape:
                count *= d
            if ref.length != count * _ITEMSIZE[ref.dtype]:
                raise IntegrityError(
                    f"{where}: {ref.length} bytes for {ref.dtype}{list(ref.shape)}"
                )
            if ref.offset + ref.length > files[ref.file].size:
                raise IntegrityError(
                    f"{where}: bytes {ref.offset}+{ref.length} lie past the end of {ref.file}"
                )

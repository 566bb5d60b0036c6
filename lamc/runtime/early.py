"""The very start of a stage server: its session's build begun before the rest of lamc,
gRPC and asyncio are imported.

Most of a stage server's cold start is importing (the interpreter, numpy, ONNX Runtime,
then lamc, gRPC and asyncio) and building the stage's session. ONNX Runtime builds a
session in C++ with the GIL released, so the build can run on one core while the serving
side is imported on another: the earlier it begins, the more of those imports it hides.
This module (the standard library and lamc's light modules only) reads the stage's entry
from the manifest with `json` alone, checks the path, size and sha256 of every file the
session parses, and begins the build on a thread of its own; the caller waits only until
the build is under way.

It is a head start and nothing more. The server then checks the whole artifact as always
(`lamc.runtime.loading.StageLoad`: the schema, consistency, every size, the runtime's
version, the weights' hashes before serving), and takes this session only when that check
passes and names the same graph (path and sha256), the same weights and the same session
options and providers. Otherwise the session is dropped and the stage is built as though
nothing had begun. Any error here begins nothing: the server meets it again, and reports it.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# `lamc serve`'s options that take no value; every other `--option` takes one.
FLAGS = frozenset({"--require-client-cert", "--insecure", "--standby"})
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
# The backend module that loads an ONNX Runtime stage (named, not imported: the runtime
# floor does not import the backends' floor).
ONNXRUNTIME_RUN = "lamc.backends.onnxruntime.run"

ServeKey = tuple[Path, int, tuple[str, ...], tuple[str, ...] | None, int | None]


def parse_providers(text: str | None) -> tuple[str, ...] | None:
    """`--providers cpu` or `cuda,cpu` -> execution provider names (None: as the manifest says)."""
    if not text:
        return None
    names = []
    for item in text.split(","):
        key = item.strip()
        if not key:
            continue
        names.append(PROVIDER_ALIASES.get(key.lower(), key))
    return tuple(names)


def devices(text: str | None) -> tuple[str, ...]:
    """`--without a,b` -> ("a", "b")."""
    return tuple(d.strip() for d in (text or "").split(",") if d.strip())


def serve_key(args: Sequence[str]) -> ServeKey | None:
    """(OUT, stage, without, providers, threads) that `lamc serve ARGS` names, read without
    the command-line library; None where ARGS holds anything this reading does not
    understand (help, Ray, a short option, not one OUT, no --stage)."""
    values: dict[str, str] = {}
    positional: list[str] = []
    items = iter(args)
    for item in items:
        if item in ("-h", "--help", "--ray") or item.startswith("--ray="):
            return None
        if item in FLAGS:
            continue
        if item.startswith("--"):
            name, eq, value = item.partition("=")
            values[name] = value if eq else next(items)
        elif item.startswith("-"):
            return None
        else:
            positional.append(item)
    if len(positional) != 1 or "--stage" not in values:
        return None
    return (
        Path(positional[0]),
        int(values["--stage"]),
        devices(values.get("--without")),
        parse_providers(values.get("--providers")),
        int(values["--threads"]) if "--threads" in values else None,
    )


class Weight:
    """One of the stage's weights as the manifest lists it (`lamc.manifest.WeightRef`'s
    fields, read without building the manifest)."""

    __slots__ = ("dtype", "file", "length", "name", "offset", "shape")

    def __init__(self, item: Mapping[str, Any]) -> None:
        self.name = str(item["name"])
        self.file = str(item["file"])
        self.offset = int(item["offset"])
        self.length = int(item["length"])
        self.dtype = str(item["dtype"])
        self.shape = tuple(int(d) for d in item["shape"])

    def key(self) -> tuple[object, ...]:
        return (self.name, self.file, self.offset, self.length, self.dtype, self.shape)


class HeadStart:
    """A session being built for `key` from the graph `model` (of sha256 `model_sha256`)
    with `weights`, `optimization` and `providers`; `result()` answers (runner, ms) once
    built (concurrent.futures is not imported this early)."""

    def __init__(self, key: ServeKey, stage: Mapping[str, Any]) -> None:
        from lamc.paths import safe_path, sha256_file

        self.key = key
        out_dir = key[0]
        files = {str(f["path"]): f for f in stage["files"]}
        self.weights = [Weight(w) for w in stage.get("weights") or ()]
        bulk = {w.file for w in self.weights}
        self.model = str(stage["model"])
        if self.model not in files or self.model in bulk:
            raise ValueError("the stage's graph is not among its files")
        # Every file the session parses is hashed before it is opened; the weights (raw
        # bytes nothing parses) are sized here and hashed by the server before it serves.
        for path, item in files.items():
            file = safe_path(out_dir, path, "files")
            if file.stat().st_size != int(item["size"]):
                raise ValueError(f"{path}: size")
            if path not in bulk and sha256_file(file) != item["sha256"]:
                raise ValueError(f"{path}: sha256")
        self.model_sha256 = str(files[self.model]["sha256"])
        session = stage.get("session") or {}
        self.threads = key[4] if key[4] is not None else int(session.get("threads", 0))
        self.optimization = str(session.get("graph_optimization", "all"))
        self.providers = tuple(key[3] if key[3] is not None else stage["providers"])
        self.under_way = threading.Event()
        self.done = threading.Event()
        self.built: tuple[Any, float] | None = None
        self.error: BaseException | None = None
        threading.Thread(target=self._build, name=f"early{key[1]}", daemon=True).start()

    def _build(self) -> None:
        interval = sys.getswitchinterval()
        try:
            from lamc.runtime.weights import map_weights

            arrays = map_weights(self.key[0], self.weights)
            module = importlib.import_module(ONNXRUNTIME_RUN)
            # Parts of the build hold the GIL; a short switch interval hands it back to the
            # build soon while the main thread imports.
            sys.setswitchinterval(min(interval, 0.0005))
            started = time.perf_counter()
            self.under_way.set()
            runner = module.load(
                str(self.key[0] / self.model),
                self.providers,
                threads=self.threads,
                optimization=self.optimization,
                initializers=arrays,
            )
            self.built = (runner, (time.perf_counter() - started) * 1000)
        except BaseException as exc:
            self.error = exc
        finally:
            sys.setswitchinterval(interval)
            self.under_way.set()
            self.done.set()

    def result(self) -> tuple[Any, float]:
        """(runner, milliseconds the build took), once built; the build's error otherwise."""
        self.done.wait()
        if self.built is None:
            raise self.error or RuntimeError("the early build ended without a session")
        return self.built

    def matches(self, key: ServeKey, spec: Any) -> bool:
        """Whether the checked manifest's stage `spec` (a `StageSpec`) for the server's own
        arguments `key` is exactly what this session was built from."""
        files = {f.path: f.sha256 for f in spec.files}
        session = spec.session
        threads = key[4] if key[4] is not None else int(session.get("threads", 0))
        providers = tuple(key[3] if key[3] is not None else spec.providers)
        return (
            key == self.key
            and spec.backend == "onnxruntime"
            and spec.model == self.model
            and files.get(spec.model) == self.model_sha256
            and [Weight(_fields(w)).key() for w in spec.weights] == [w.key() for w in self.weights]
            and threads == self.threads
            and str(session.get("graph_optimization", "all")) == self.optimization
            and providers == self.providers
        )


def _fields(weight: Any) -> dict[str, Any]:
    return {name: getattr(weight, name) for name in Weight.__slots__}


_begun: HeadStart | None = None


def begin(args: Sequence[str], wait_s: float = 60.0) -> None:
    """Begin building the session of the stage `lamc serve ARGS` names, and return once the
    build is under way (ONNX Runtime imported, weights mapped). Only for the primary plan's
    ONNX Runtime stages; anything else, and any error, begins nothing."""
    global _begun
    try:
        key = serve_key(args)
        if key is None or key[2]:
            return
        manifest = key[0] / "manifest.json"
        if manifest.is_symlink():
            return
        data = json.loads(manifest.read_bytes())
        stage = data["stages"][key[1]]
        if key[1] < 0 or stage.get("backend") != "onnxruntime":
            return
        head = HeadStart(key, stage)
    except Exception:  # the server meets the same error and reports it
        return
    head.under_way.wait(wait_s)
    _begun = head


def take(key: ServeKey, spec: Any) -> HeadStart | None:
    """The head start begun for exactly `key` and the checked stage `spec`, or None (any
    other head start is dropped)."""
    global _begun
    head, _begun = _begun, None
    if head is not None and head.matches(key, spec):
        return head
    return None

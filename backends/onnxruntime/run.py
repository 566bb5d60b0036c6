"""ONNX Runtime on the edge: load a stage's model and run it. Imports only numpy and
onnxruntime, so the executor never pulls in onnx, torch or networkx."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lamc.errors import RuntimeEnvironmentError

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _quiet_logger() -> None:
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:
        pass


_quiet_logger()


def is_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def session_options(
    *,
    threads: int = 0,
    optimization: str = "all",
    optimized_model_path: str | None = None,
    shared_pool: bool = False,
) -> Any:
    """Session options lamc uses everywhere (profile, compile-time checks, the executor).

    `shared_pool=True` runs the session on the process's global thread pool (see
    `use_global_pool`) instead of a pool of its own."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    # Once the process has a global pool, ONNX Runtime refuses sessions with pools of their own.
    if shared_pool or _GLOBAL_POOL is not None:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    return options


_GLOBAL_POOL: int | None = None


def use_global_pool(threads: int = 0) -> None:
    """One intra-op thread pool for every session of this process that asks for it.

    Stages run in one process take turns; with a pool each, idle pools keep spinning on
    the cores the running stage needs (3 stages of gpt2-small ran 1.34x slower than one
    session; with the shared pool 1.02x). Set once per process."""
    global _GLOBAL_POOL
    if _GLOBAL_POOL is None:
        import onnxruntime.capi.onnxruntime_pybind11_state as state

        state.set_global_thread_pool_sizes(threads, 1)
        _GLOBAL_POOL = threads


def new_session(
    model: str | bytes, providers: Sequence[str] = ("CPUExecutionProvider",), **options: Any
) -> Any:
    """An ONNX Runtime session with lamc's options (and the process's thread-pool mode).
    Everything in lamc that creates a session goes through here."""
    import onnxruntime as ort

    return ort.InferenceSession(
        model, sess_options=session_options(**options), providers=list(providers)
    )


def check_providers(requested: Sequence[str]) -> list[str]:
    """The providers to use, in order; a requested provider that is missing is an error,
    never a silent fall back to the CPU."""
    available = available_providers()
    missing = [p for p in requested if p not in available]
    if missing:
        raise RuntimeEnvironmentError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime (has: {', '.join(available)})",
            hint="install the runtime that provides them (e.g. onnxruntime-gpu), or override with --providers cpu",
        )
    return list(requested)


@dataclass
class Runner:
    """One loaded stage: `run(feeds) -> outputs`, by name."""

    session: Any
    input_names: list[str]
    output_names: list[str]
    # The weights the session reads in place: alive as long as the session is.
    keep: list[Any] = field(default_factory=list, repr=False)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(
            self.output_names, {name: feeds[name] for name in self.input_names}
        )
        return dict(zip(self.output_names, outputs))


def load(
    model_path: str | bytes,
    providers: Sequence[str],
    *,
    threads: int = 0,
    optimization: str = "all",
    shared_pool: bool = False,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> Runner:
    """A session for one stage. `initializers` are weights handed over as they are (memory
    mapped, shared with other sessions in this process) instead of read from the model's
    external data."""
    import onnxruntime as ort

    chosen = check_providers(providers)
    if shared_pool:
        use_global_pool(threads)
    options = session_options(threads=threads, optimization=optimization, shared_pool=shared_pool)
    values = []
    if initializers:
        names = list(initializers)
        values = [ort.OrtValue.ortvalue_from_numpy(initializers[n]) for n in names]
        options.add_external_initializers(names, values)
    path = os.fspath(model_path) if not isinstance(model_path, bytes) else model_path
    session = ort.InferenceSession(path, sess_options=options, providers=chosen)
    return Runner(
        session,
        [i.name for i in session.get_inputs()],
        [o.name for o in session.get_outputs()],
        keep=values,
    )

"""ONNX Runtime on the edge: load a stage's model and run it. Imports only numpy and
onnxruntime, so the executor never pulls in onnx, torch or networkx."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lamc.errors import RuntimeEnvironmentError

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


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
    spinning: bool = True,
) -> Any:
    """Session options lamc uses everywhere (profile, compile-time checks, the executor).

    `spinning=False` stops idle pool threads from busy-waiting: several sessions taking
    turns on one process's cores would otherwise steal each other's time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    return options


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
    spinning: bool = True,
) -> Runner:
    import onnxruntime as ort

    chosen = check_providers(providers)
    options = session_options(threads=threads, optimization=optimization, spinning=spinning)
    path = os.fspath(model_path) if not isinstance(model_path, bytes) else model_path
    session = ort.InferenceSession(path, sess_options=options, providers=chosen)
    return Runner(
        session, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    )

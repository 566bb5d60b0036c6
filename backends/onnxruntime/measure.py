"""Timing helpers on the compile host: run a model, expose intermediate tensors, time a
sub-model on its real inputs. Used by calibration benchmarks and tests."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from lamc.backends.onnxruntime.run import session_options


def activations(
    model: ir.Model, names: Iterable[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The values of the named tensors when `model` runs on `feeds` (inputs included)."""
    import onnxruntime as ort

    proto = ir.to_proto(model)
    wanted = sorted(set(names) - set(feeds))
    existing = {o.name for o in proto.graph.output}
    for name in wanted:
        if name not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(
        proto.SerializeToString(),
        sess_options=session_options(),
        providers=["CPUExecutionProvider"],
    )
    outputs = [o.name for o in session.get_outputs()]
    values = dict(zip(outputs, session.run(outputs, dict(feeds))))
    return {**dict(feeds), **values}


def median_ms(
    proto: onnx.ModelProto | bytes,
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int = 20,
    budget_s: float = 3.0,
    options: Any = None,
) -> float:
    """Median wall time of session.run, after warm-up, in milliseconds."""
    import onnxruntime as ort

    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    session = ort.InferenceSession(
        data, sess_options=options or session_options(), providers=["CPUExecutionProvider"]
    )
    needed = {i.name: feeds[i.name] for i in session.get_inputs()}
    for _ in range(3):
        session.run(None, needed)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < runs or (time.perf_counter() < deadline and len(samples) < runs * 5):
        started = time.perf_counter()
        session.run(None, needed)
        samples.append(time.perf_counter() - started)
        if len(samples) >= runs and time.perf_counter() > deadline:
            break
    return 1000.0 * statistics.median(samples)

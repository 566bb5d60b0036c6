"""Comparing a compiled pipeline with its source model on the same inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lamc.frontend.capture import Captured, random_inputs
from lamc.manifest import Manifest


@dataclass(frozen=True)
class Comparison:
    case: str
    output: str
    max_abs: float
    max_rel: float  # max |a - b| / max |b|: normwise, so near-zero elements do not explode it
    cosine: float
    ok: bool
    mean_rel: float = 0.0  # mean |a - b| / mean |b|


@dataclass(frozen=True)
class StageComparison:
    """One stage's outputs (fed by the pipeline's own upstream stages) against the same
    tensors of the source model: where the error of a compressed pipeline comes from."""

    stage: int
    device: str
    precision: str
    max_rel: float
    mean_rel: float
    cosine: float


def errors(have: np.ndarray, want: np.ndarray) -> tuple[float, float, float, float]:
    """(max abs, max relative, mean relative, cosine) of `have` against `want`."""
    a = np.asarray(have, dtype=np.float64)
    b = np.asarray(want, dtype=np.float64)
    diff = np.abs(a - b)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    mean_scale = float(np.abs(b).mean()) if b.size else 0.0
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.dot(a.ravel(), b.ravel()) / denominator) if denominator > 0 else 1.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    mean_abs = float(diff.mean()) if diff.size else 0.0
    mean_rel = mean_abs / mean_scale if mean_scale > 0 else mean_abs
    return max_abs, max_rel, mean_rel, cosine


@dataclass
class Report:
    rows: list[Comparison]
    stages: list[StageComparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": [asdict(r) for r in self.rows],
            "stages": [asdict(s) for s in self.stages],
        }


def inputs_for(
    captured: Captured, manifest: Manifest, samples: int, seed: int = 0
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The example inputs plus random ones in the dynamic ranges (the smallest sizes, and
    random sizes up to four times the example's)."""
    cases: list[tuple[str, dict[str, np.ndarray]]] = [("example", dict(captured.example_inputs))]
    rng = np.random.default_rng(seed)
    example = dict(captured.operating_point)
    for i in range(samples):
        binding: dict[str, int] = {}
        for name, (low, high) in captured.dims.items():
            if i == 0:
                binding[name] = max(low, 1) if name != "past" else low
            else:
                top = max(low, min(high, 4 * max(example.get(name, 1), 1)))
                binding[name] = int(rng.integers(low, top + 1))
        label = ", ".join(f"{k}={v}" for k, v in sorted(binding.items()))
        cases.append((f"random {label}", random_inputs(captured, binding, rng)))
    return cases


def compare(
    pipeline: Any,
    reference: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    cases: list[tuple[str, dict[str, np.ndarray]]],
    *,
    atol: float,
    rtol: float,
    max_error: float | None = None,
) -> Report:
    """Each output is ok within atol/rtol elementwise or, with `max_error` (a lossy
    pipeline's accuracy budget), when its normwise relative error is within it."""
    rows = []
    for label, feeds in cases:
        got = pipeline.run(feeds)
        expected = reference(feeds)
        for name, want in expected.items():
            max_abs, max_rel, mean_rel, cosine = errors(got[name], want)
            ok = bool(np.allclose(got[name].astype(np.float64), want, atol=atol, rtol=rtol))
            if max_error is not None:
                ok = ok or max_rel <= max_error
            rows.append(Comparison(label, name, max_abs, max_rel, cosine, ok, mean_rel))
    return Report(rows)


def stage_report(
    pipeline: Any, model: Any, cases: list[tuple[str, dict[str, np.ndarray]]]
) -> list[StageComparison]:
    """Each stage's floating-point outputs against the source model's same tensors (the
    captured IR run whole in ONNX Runtime), worst over outputs and cases."""
    from lamc.backends.onnxruntime.measure import activations

    specs = pipeline.manifest.stages
    worst: dict[int, list[float]] = {s.index: [0.0, 0.0, 1.0] for s in specs}
    for _, feeds in cases:
        trace: dict[int, dict[str, np.ndarray]] = {}
        pipeline.run(feeds, trace=trace)
        names = {n for outputs in trace.values() for n in outputs}
        values = activations(model, names, feeds)
        for index, outputs in trace.items():
            for name, have in outputs.items():
                if have.dtype.kind != "f" or name not in values:
                    continue
                _, max_rel, mean_rel, cosine = errors(have, values[name])
                w = worst[index]
                w[0], w[1], w[2] = max(w[0], max_rel), max(w[1], mean_rel), min(w[2], cosine)
    return [StageComparison(s.index, s.device, s.precision, *worst[s.index]) for s in specs]

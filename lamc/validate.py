"""Comparing a compiled pipeline with its source model on the same inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
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


@dataclass
class Report:
    rows: list[Comparison]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": [asdict(r) for r in self.rows]}


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
            have = got[name].astype(np.float64)
            want64 = np.asarray(want, dtype=np.float64)
            diff = np.abs(have - want64)
            max_abs = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(want64).max()) if want64.size else 0.0
            denominator = float(np.linalg.norm(have) * np.linalg.norm(want64))
            cosine = (
                float(np.dot(have.ravel(), want64.ravel()) / denominator)
                if denominator > 0
                else 1.0
            )
            max_rel = max_abs / scale if scale > 0 else max_abs
            ok = bool(np.allclose(have, want64, atol=atol, rtol=rtol))
            if max_error is not None:
                ok = ok or max_rel <= max_error
            rows.append(Comparison(label, name, max_abs, max_rel, cosine, ok))
    return Report(rows)

"""The compile driver, top to bottom: capture -> passes -> plan -> slice -> build -> manifest.

Each step is one call you can see here; the CLI and the Python API both go through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lamc.frontend import Captured, CaptureOptions, capture
from lamc.workload import Workload


@dataclass
class Analysed:
    captured: Captured
    workload: Workload
    seconds: dict[str, float] = field(default_factory=dict)


def analyse(
    ref: str,
    options: CaptureOptions | None = None,
    *,
    dump_ir: Path | None = None,
    captured: Captured | None = None,
) -> Analysed:
    """Capture MODEL and run the analysis passes: the workload the partitioner needs."""
    from lamc.passes.analyze import Analyze
    from lamc.passes.base import PassManager
    from lamc.passes.units import BuildUnits

    seconds: dict[str, float] = {}
    if captured is None:
        started = time.perf_counter()
        captured = capture(ref, options)
        seconds["capture"] = time.perf_counter() - started
    started = time.perf_counter()
    manager = PassManager(
        [Analyze(captured.operating_point), BuildUnits(captured.name)], dump_ir=dump_ir
    )
    manager.run(captured.model)
    seconds["analyse"] = time.perf_counter() - started
    workload: Workload = captured.model.meta["lamc.workload"]
    return Analysed(captured, workload, seconds)

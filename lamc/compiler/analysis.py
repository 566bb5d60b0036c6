"""Capture and analysis: the IR with its costs and units, and the workloads the planner
costs (the operating point's, and for decoders one decode step's)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lamc.frontend import Captured, CaptureOptions, capture
from lamc.workload import Workload

# Passes `analyse` runs; the partitioner's tags continue their numbering in --dump-ir.
ANALYSIS_PASSES = 2


@dataclass
class Analysed:
    captured: Captured
    workload: Workload
    seconds: dict[str, float] = field(default_factory=dict)
    granularity: str = "block"


def analyse(
    ref: str,
    options: CaptureOptions | None = None,
    *,
    dump_ir: Path | None = None,
    captured: Captured | None = None,
    granularity: str = "block",
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
        [Analyze(captured.operating_point), BuildUnits(captured.name, granularity=granularity)],
        dump_ir=dump_ir,
    )
    manager.run(captured.model)
    seconds["analyse"] = time.perf_counter() - started
    workload: Workload = captured.model.meta["lamc.workload"]
    workload = attach_kv_bytes(captured, workload)
    return Analysed(captured, workload, seconds, granularity)


def attach_kv_bytes(captured: Captured, workload: Workload) -> Workload:
    """A decoder's KV cache per token and sequence, charged to the unit of each layer's
    attention (the unit that reads the layer's past keys): what planning with `--context`
    adds to each stage's memory."""
    from dataclasses import replace

    import numpy as np

    from lamc.ir import annotation

    kv = captured.kv_cache
    if kv is None:
        return workload
    inputs = {v.name: v for v in captured.model.graph.inputs}
    extra = [0] * len(workload.units)
    names = [u.name for u in workload.units]
    for layer, (key, value) in enumerate(kv.past_inputs):
        scope = kv.layer_scopes[layer] if layer < len(kv.layer_scopes) else ""
        for name in (key, value):
            tensor = inputs.get(name)
            if tensor is None:
                continue
            users = [annotation(use.node, "lamc.unit") for use in tensor.uses()]
            readers = sorted({u for u in users if isinstance(u, int)})
            if not readers:
                continue
            # The layer's own unit (other units may read only the past length).
            own = [u for u in readers if scope and scope in names[u].split("+")[0]]
            readers = own or readers[-1:]
            itemsize = np.dtype(tensor.dtype.numpy()).itemsize if tensor.dtype else 4
            extra[readers[0]] += kv.kv_heads * kv.head_dim * itemsize
    units = tuple(
        replace(u, kv_bytes_per_token=u.kv_bytes_per_token + extra[u.index]) for u in workload.units
    )
    # The caches stay in their stages (lamc.runtime.kvcache): no link carries them.
    resident = frozenset(n for pair in (*kv.past_inputs, *kv.present_outputs) for n in pair)
    return replace(workload, units=units, resident=resident)


def decode_workload(analysed: Analysed, context: int = 0) -> Workload:
    """The workload of one decode step of a decoder: one new token per sequence against a
    cache of half the planned context (the average over a generation). The same units
    as the prefill workload, so the two cost tables add up entry by entry."""
    from lamc.errors import UsageError
    from lamc.passes.analyze import Analyze
    from lamc.passes.base import PassManager
    from lamc.passes.units import BuildUnits

    captured, prefill = analysed.captured, analysed.workload
    kv = captured.kv_cache
    if kv is None:
        raise UsageError(
            "--objective generate needs a decoder captured with its KV cache (for the zoo: kv=1)"
        )
    binding = dict(captured.operating_point)
    seq = next((d for d in binding if d not in (kv.past_dim, "batch")), None)
    if seq is not None:
        binding[seq] = 1
    low, high = captured.dims.get(kv.past_dim, (0, kv.max_context))
    binding[kv.past_dim] = min(max((context or kv.max_context) // 2, low), high)
    granularity = analysed.granularity
    model = captured.model
    saved = model.meta.get("lamc.workload")
    try:
        PassManager([Analyze(binding), BuildUnits(captured.name, granularity=granularity)]).run(
            model
        )
        step: Workload = model.meta["lamc.workload"]
    finally:
        # The IR's annotations go back to the operating point the rest of the compile uses.
        PassManager(
            [Analyze(captured.operating_point), BuildUnits(captured.name, granularity=granularity)]
        ).run(model)
        if saved is not None:
            model.meta["lamc.workload"] = saved
    if [u.name for u in step.units] != [u.name for u in prefill.units]:
        from lamc.errors import InternalError

        raise InternalError("the decode step's units differ from the prefill's")
    return attach_kv_bytes(captured, step)

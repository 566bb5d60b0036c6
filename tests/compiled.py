"""Compile test models once per session and run them."""

from __future__ import annotations

from pathlib import Path

from lamc.compiler import CompileOptions, CompileResult, compile_model
from lamc.passes.partition.planner import PlanRequest
from lamc.topology import Constraints
from tests.conftest import analysed_model

ROOT = Path(__file__).parent.parent
MINIPCS = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"


def compile_zoo(
    ref: str,
    out: Path,
    stages: int | None = None,
    *,
    split_after: tuple[str, ...] = (),
    granularity: str = "block",
    topology: Path = MINIPCS,
    failover: int | None = 0,
) -> CompileResult:
    """Compile a (cached) captured model into `stages` stages on four identical CPUs.
    Failover pipelines are left out unless asked for (None: the compiler's default, on
    with 3+ devices): tests/test_failover.py and the failover serving tests cover them,
    and the rest of the suite stays fast."""
    analysed = analysed_model(ref) if granularity == "block" else _fine(ref)
    request = PlanRequest(constraints=Constraints(stages=stages, split_after=split_after))
    return compile_model(
        ref,
        topology,
        out,
        CompileOptions(request=request, granularity=granularity, failover=failover),
        analysed=analysed,
    )


_FINE: dict[str, object] = {}


def _fine(ref: str) -> object:
    from lamc.compiler import analyse
    from lamc.frontend import capture

    if ref not in _FINE:
        _FINE[ref] = analyse(ref, captured=capture(ref), granularity="fine")
    return _FINE[ref]

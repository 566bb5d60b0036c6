"""Objective generate: a decoder's prefill plus N decode steps, each phase costed on its
own workload, and why the plan has as many stages as it has."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lamc.cost import CostModel
from lamc.passes.compress.registry import METHODS
from lamc.passes.partition.dp import LATENCY, PartitionProblem, Segment, Solution, evaluate, solve
from lamc.plan import Plan


def links(cost: CostModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transfer between stages, client to each device, and each device to the client."""
    devices = range(len(cost.devices))
    inbound = np.array([cost.client_ms(d, 0, inbound=True) for d in devices])
    outbound = np.array([cost.client_ms(d, cost.n, inbound=False) for d in devices])
    return cost.transfer_table(), inbound, outbound


@dataclass
class Generation:
    """The decode step's costs beside the prefill's: what objective `generate` adds up."""

    decode: CostModel
    new_tokens: int

    def __post_init__(self) -> None:
        self.decode_links = links(self.decode)

    def compute(self, prefill: CostModel, decode: CostModel | None = None) -> np.ndarray:
        return prefill.compute_table() + self.new_tokens * (decode or self.decode).compute_table()

    def links(
        self, prefill: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.new_tokens
        t, i, o = prefill
        dt, di, do = self.decode_links
        return t + n * dt, i + n * di, o + n * do


def chosen_compute(cost: CostModel, choice: np.ndarray | None, names: list[str]) -> np.ndarray:
    """[D, n+1, n+1] compute of every stage under the method chosen for it."""
    if choice is None:
        return cost.compute_table()
    tables = np.stack([cost.with_method(METHODS[m].cost).compute_table() for m in names])
    return np.take_along_axis(tables, choice[None], axis=0)[0]


def explain_generation(
    result: Plan,
    solution: Solution,
    problem: PartitionProblem,
    step: Generation,
    prefill: CostModel,
    prefill_links: tuple[np.ndarray, np.ndarray, np.ndarray],
    choice: np.ndarray | None,
    names: list[str],
) -> Plan:
    """Prefill and per-token decode time of the plan, and why it uses as many stages as it
    does: the best plans with one stage more and one fewer, by the same measure."""
    prefill_problem = PartitionProblem(chosen_compute(prefill, choice, names), *prefill_links)
    decode_problem = PartitionProblem(
        chosen_compute(step.decode, choice, names), *step.decode_links
    )

    def times(segments: tuple[Segment, ...]) -> tuple[float, float]:
        return evaluate(prefill_problem, segments)[1], evaluate(decode_problem, segments)[1]

    # The plan's own figures are the prefill's (one prompt through the pipeline).
    bottleneck_ms, prefill_ms = evaluate(prefill_problem, solution.segments)
    decode_ms = evaluate(decode_problem, solution.segments)[1]
    total_ms = prefill_ms + step.new_tokens * decode_ms
    why = []
    count = len(solution.segments)
    if problem.stages is not None:
        why.append(f"{count} stage(s), as asked")
    for k in (count - 1, count + 1):
        if k < 1 or k > problem.n_devices or problem.stages is not None:
            continue
        other = solve(replace(problem, stages=k), LATENCY)
        if other is None:
            why.append(f"no plan with {k} stage(s) fits the devices and constraints")
            continue
        other_prefill, other_decode = times(other.segments)
        other_total = other_prefill + step.new_tokens * other_decode
        verdict = "slower" if other_total > total_ms else "not faster"
        why.append(
            f"{k} stage(s) would be {verdict}: decode {other_decode:.3g} ms/token "
            f"(vs {decode_ms:.3g}), prefill {other_prefill:.3g} ms (vs {prefill_ms:.3g}), "
            f"{other_total:.4g} ms for {step.new_tokens} tokens (vs {total_ms:.4g})"
        )
    # Each stage's share of one decode step (and its link onward), for the decode timeline.
    segments = solution.segments
    decode_stages = [
        {
            "compute_ms": float(decode_problem.compute[seg.device, seg.start, seg.end]),
            "transfer_ms": float(
                decode_problem.transfer[seg.device, segments[i + 1].device, seg.end]
                if i + 1 < len(segments)
                else decode_problem.outbound[seg.device]
            ),
        }
        for i, seg in enumerate(segments)
    ]
    generation = {
        "decode_stages": decode_stages,
        "decode_inbound_ms": float(decode_problem.inbound[segments[0].device]),
        "new_tokens": step.new_tokens,
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": decode_ms,
        "total_ms": total_ms,
        "decode_binding": dict(sorted(step.decode.workload.binding.items())),
        "why": why,
    }
    return replace(
        result, bottleneck_ms=bottleneck_ms, latency_ms=prefill_ms, generation=generation
    )

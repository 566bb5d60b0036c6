"""Brute force: every ordered subset of devices x every composition of the units."""

from __future__ import annotations

import itertools
import math

from lamc.passes.partition.dp import THROUGHPUT, PartitionProblem, Segment, evaluate


def brute_force(problem: PartitionProblem, objective: str) -> float:
    n, d_count = problem.n_units, problem.n_devices
    best = math.inf
    for m in range(1, min(n, d_count) + 1):
        if problem.stages is not None and m != problem.stages:
            continue
        for devices in itertools.permutations(range(d_count), m):
            for cuts in itertools.combinations(range(1, n), m - 1):
                bounds = (0, *cuts, n)
                segments = tuple(Segment(devices[i], bounds[i], bounds[i + 1]) for i in range(m))
                bottleneck, latency = evaluate(problem, segments)
                best = min(best, bottleneck if objective == THROUGHPUT else latency)
    return best

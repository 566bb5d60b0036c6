"""Replicated stages for training: how long the exact search over device groups takes
beside the chain search, and how often (and by how much) a replicated stage beats the
best chain, on random heterogeneous instances.

    .venv/bin/python benchmarks/hybrid.py [--instances 5]

Only sizes within the search's budget (`hybrid.searchable`: 4^D (n+1)^2 work) are run.

Each instance: n units with random forward+backward costs, D devices whose speeds differ
by up to 4x, links of 0.1-1 ms a micro-batch, trainable weights of up to 4% of the work's
bytes (a LoRA-sized all-reduce) or of all of them (full training), memory ample, 8
micro-batches. Both searches cost GPipe's order (what a pipeline with replicated stages
runs), so the two step times compare like for like.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from lamc.passes.partition import hybrid as hy
from lamc.passes.partition.training import TrainingProblem
from lamc.passes.partition.training import solve as solve_chain


def instance(n: int, d: int, seed: int, heavy: bool) -> hy.HybridProblem:
    rng = np.random.default_rng(seed)
    unit_ms = rng.uniform(0.5, 2.0, size=n)
    speed = rng.uniform(1.0, 4.0, size=d)
    prefix = np.concatenate([[0.0], np.cumsum(unit_ms)])
    work = np.full((d, n + 1, n + 1), math.inf)
    upper = np.triu_indices(n + 1, k=1)
    for k in range(d):
        full = (prefix[None, :] - prefix[:, None]) * speed[k] + 0.05
        work[k][upper] = full[upper]
    one = rng.uniform(0.1, 1.0, size=(d, d))
    link = np.repeat(((one + one.T) / 2)[:, :, None], n + 1, axis=2)
    zeros = np.zeros((d, n + 1, n + 1))
    problem = TrainingProblem(
        work=work,
        link=link,
        base_memory=zeros,
        activations=np.zeros((n + 1, n + 1)),
        capacity=np.full(d, 1e12),
        update=zeros.copy(),
        micro_batches=8,
        gpipe=True,
    )
    share = 1.0 if heavy else rng.uniform(0.005, 0.04)
    t = np.concatenate([[0.0], np.cumsum(unit_ms * share)])
    trainable = np.maximum(t[None, :] - t[:, None], 0.0)  # MB
    latency = np.full((d, d), 0.1)
    per_mb = rng.uniform(0.5, 8.0)  # ms a MB: 1 Gbit/s is 8
    return hy.HybridProblem(problem, trainable, latency, np.full((d, d), per_mb))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=5)
    args = parser.parse_args()
    print(
        "| devices | units | gradients | chain search ms | hybrid search ms | replicated wins "
        "| median speedup where it wins | best |"
    )
    print("|---|---|---|---|---|---|---|---|")
    sizes = [(d, n) for d in (2, 3, 4, 5) for n in (4, 12, 24) if hy.searchable(d, n)]
    for d, n in sizes:
        for heavy in (False, True):
            chain_ms, hybrid_ms, gains = [], [], []
            for seed in range(args.instances):
                h = instance(n, d, seed, heavy)
                started = time.perf_counter()
                chain = solve_chain(h.problem)
                chain_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                found = hy.solve(h)
                hybrid_ms.append((time.perf_counter() - started) * 1000)
                assert chain is not None and found is not None
                if found.replicated and found.step_ms < chain.step_ms * (1 - 1e-9):
                    gains.append(chain.step_ms / found.step_ms)
            won = f"{len(gains)}/{args.instances}"
            median = f"{statistics.median(gains):.2f}x" if gains else "-"
            best = f"{max(gains):.2f}x" if gains else "-"
            print(
                f"| {d} | {n} | {'full' if heavy else 'LoRA-sized'} "
                f"| {statistics.median(chain_ms):.1f} | {statistics.median(hybrid_ms):.1f} "
                f"| {won} | {median} | {best} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Decoding through the pipeline: tokens/s side by side.

    .venv/bin/python benchmarks/generate.py [--model zoo:gpt2:small,kv=1,layers=6] [--tokens 64]

1. One sequence, in process: the model compiled into 2 stages vs compiled into 1 stage
   (one ONNX Runtime session of the whole model, with the same KV handling: caches in,
   presents out, one graph for prefill and decode). Decode tokens/s after the prefill,
   runs interleaved; target >= 0.9.
2. Two stage processes (`lamc serve`, one intra-op thread each): aggregate decode tokens/s
   with 4 sequences in flight (4 client threads, each generating its own sequence) vs
   one sequence. Target >= 1.5x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPOLOGY = ROOT / "examples" / "topologies" / "4x-minipc-1gbe.yaml"
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]


def compile_stages(ref: str, out: Path, stages: int, analysed: object) -> None:
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints

    request = PlanRequest(constraints=Constraints(stages=stages))
    compile_model(ref, TOPOLOGY, out, CompileOptions(request=request), analysed=analysed)


def decode_rate(pipeline: object, tokens: int) -> float:
    """Decode tokens/s of one sequence (the prefill step excluded)."""
    from lamc.runtime.generate import generate

    steps = generate(pipeline, [PROMPT], tokens)
    next(steps)  # prefill
    started = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - started)


def concurrent_rate(client: object, sequences: int, tokens: int) -> float:
    """Aggregate decode tokens/s of `sequences` sequences generated at once."""
    from lamc.runtime.generate import generate

    barrier = threading.Barrier(sequences + 1)
    counts = [0] * sequences

    def one(i: int) -> None:
        steps = generate(client, [[t + i for t in PROMPT]], tokens)
        next(steps)
        barrier.wait()
        counts[i] = sum(1 for _ in steps)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sequences)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:gpt2:small,kv=1,layers=6")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from lamc.compiler import analyse
    from lamc.runtime.executor import Pipeline
    from lamc.runtime.hosts import Endpoints
    from lamc.runtime.remote import RemotePipeline
    from tests.runtime.servers import StageServers

    analysed = analyse(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        compile_stages(args.model, one, 1, analysed)
        compile_stages(args.model, two, 2, analysed)
        whole, split = Pipeline.open(one), Pipeline.open(two)
        decode_rate(whole, 8)
        decode_rate(split, 8)
        ratios, whole_rates, split_rates = [], [], []
        for i in range(args.rounds * 2):
            order = [(whole, whole_rates), (split, split_rates)]
            for pipeline, rates in order if i % 2 == 0 else order[::-1]:
                rates.append(decode_rate(pipeline, args.tokens))
            if i % 2 == 1:
                ratios.append(
                    statistics.median(split_rates[-2:]) / statistics.median(whole_rates[-2:])
                )
        local_ratio = statistics.median(split_rates) / statistics.median(whole_rates)
        del whole, split
        with (
            StageServers(two, 2, common=["--threads", "1"]) as servers,
            RemotePipeline(two, Endpoints(dict(enumerate(servers.addresses)))) as client,
        ):
            concurrent_rate(client, 1, 8)
            single = statistics.median(concurrent_rate(client, 1, args.tokens) for _ in range(2))
            four = statistics.median(concurrent_rate(client, 4, args.tokens) for _ in range(2))

    print(f"\n{args.model}, {len(PROMPT)}-token prompt, {args.tokens} new tokens")
    print("| case | tokens/s | reference | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| 2 stages in process vs 1 session, one sequence | {statistics.median(split_rates):.1f} "
        f"| {statistics.median(whole_rates):.1f} | **{local_ratio:.3f}** | ≥ 0.9 |"
    )
    print(
        f"| 2 stage processes, 4 sequences in flight vs 1 | {four:.1f} | {single:.1f} "
        f"| **{four / single:.2f}x** | ≥ 1.5x |"
    )


if __name__ == "__main__":
    main()

"""Replicated stages for serving (`lamc plan --replicate`) beside the best chain: for zoo
models on the example topologies, the predicted bottleneck of each, the throughput ratio,
the plan, and how long each search took (the chain's and the replicated one's, timed side
by side in one run).

    .venv/bin/python benchmarks/replicate.py [--models zoo:gpt2 ...] [--topologies T.yaml ...]

Models are planned from shapes only (no weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from lamc.compiler import analyse, plan_model
    from lamc.frontend import CaptureOptions
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import load_topology

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["zoo:gpt2", "zoo:bert", "zoo:vit"])
    parser.add_argument(
        "--topologies",
        nargs="+",
        type=Path,
        default=[
            *sorted((ROOT / "examples/topologies").glob("*.yaml")),
            ROOT / "tests/data/two-boards-two-pcs.yaml",
        ],
    )
    args = parser.parse_args()
    print(
        "| topology | model | chain bottleneck ms | replicated bottleneck ms | throughput x "
        "| chain search s | replicated search s | plan |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        analysed = analyse(model, CaptureOptions(weights=False))
        for path in args.topologies:
            topology = load_topology(path)
            started = time.perf_counter()
            chain, _ = plan_model(analysed, topology, PlanRequest(branches="off"))
            chain_s = time.perf_counter() - started
            started = time.perf_counter()
            best, _ = plan_model(analysed, topology, PlanRequest(branches="off", replicate="auto"))
            replicated_s = time.perf_counter() - started
            searched = [n for n in best.notes if "replicated stages" in n]
            plan = best.text if best.replicated else f"(chain) {searched[-1] if searched else ''}"
            print(
                f"| {topology.name} | {model} | {chain.bottleneck_ms:.2f} | "
                f"{best.bottleneck_ms:.2f} | {chain.bottleneck_ms / best.bottleneck_ms:.2f} | "
                f"{chain_s:.2f} | {replicated_s:.2f} | {plan} |"
            )


if __name__ == "__main__":
    main()

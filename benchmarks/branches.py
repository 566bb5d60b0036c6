"""Branch-parallel plans beside the best chain: for a two-encoder fusion model and CLIP on
the example sensor topologies, the plan lamc chooses and the best single chain of stages,
predicted bottleneck and latency, for both objectives (what `lamc plan --compare` lists).

    .venv/bin/python benchmarks/branches.py [--models zoo:fusion clip] [--topologies T.yaml ...]

Models are planned from shapes only (no weights), CLIP from a checkpoint it writes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from locality import clip_checkpoint  # type: ignore[import-not-found]

    from lamc.compiler import analyse, plan_model
    from lamc.frontend import CaptureOptions
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import load_topology

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["zoo:fusion", "clip"])
    parser.add_argument(
        "--topologies",
        nargs="+",
        type=Path,
        default=[
            ROOT / "examples/topologies/sensor-hub-wifi4.yaml",
            ROOT / "examples/topologies/camera-mic-edge.yaml",
        ],
    )
    args = parser.parse_args()
    print(
        f"{'topology':<17} {'model':<10} {'objective':<10} {'chosen':<6} "
        f"{'bottleneck ms':>13} {'latency ms':>10} {'chain bottleneck':>16} {'chain latency':>13}  plan"
    )
    with tempfile.TemporaryDirectory(prefix="lamc-branches-") as tmp:
        for model in args.models:
            ref = clip_checkpoint(Path(tmp) / "clip") if model == "clip" else model
            analysed = analyse(ref, CaptureOptions(weights=model == "clip"))
            for path in args.topologies:
                topology = load_topology(path)
                for objective in ("throughput", "latency"):
                    best, _ = plan_model(
                        analysed, topology, PlanRequest(objective=objective, compare=True)
                    )
                    chain, _ = plan_model(
                        analysed, topology, PlanRequest(objective=objective, branches="off")
                    )
                    print(
                        f"{topology.name:<17} {model:<10} {objective:<10} "
                        f"{'dag' if best.is_dag else 'chain':<6} {best.bottleneck_ms:>13.2f} "
                        f"{best.latency_ms:>10.2f} {chain.bottleneck_ms:>16.2f} "
                        f"{chain.latency_ms:>13.2f}  {best.text}"
                    )


if __name__ == "__main__":
    main()

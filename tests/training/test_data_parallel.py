"""Data-parallel training (`lamc train --data-parallel`): one process a device, each the
whole model on its share of every step's micro-batches, the trainable gradients
all-reduced over gloo before each update. It computes what one process computes: the
same losses step by step and the same weights at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lamc.training.job import Job
from lamc.training.launch import gather, run_local
from lamc.training.worker import run_reference

MODEL = "zoo:gpt2:test"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tokens.npz"
    rng = np.random.default_rng(1)
    np.savez(path, input_ids=rng.integers(0, 512, size=(48, 16)))
    return path


def _job(tokens: Path, method: str, replicas: tuple[int, ...], **extra: object) -> Job:
    return Job(
        model=MODEL,
        method=method,
        data=str(tokens),
        split_points=(),
        devices=tuple(f"cpu{k}" for k in range(len(replicas))),
        replicas=replicas,
        micro_batches=sum(replicas),
        micro_batch_size=2,
        steps=12,
        lr=0.05,
        optimizer="sgd",
        clip=1.0,
        lora_rank=4,
        lora_targets=("c_attn",),
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("method", "replicas"), [("lora", (3, 1)), ("full", (2, 2))])
def test_data_parallel_equals_one_process(
    tokens: Path, tmp_path: Path, method: str, replicas: tuple[int, ...]
) -> None:
    job = _job(tokens, method, replicas)
    records = run_local(job, tmp_path)
    losses, state = run_reference(job)
    got = np.array([r["loss"] for r in records])
    np.testing.assert_allclose(got, losses, rtol=1e-5)
    from safetensors.numpy import load_file

    trained = load_file(str(tmp_path / "stage-0.safetensors"))
    # Tied weights are saved under each name they have; the reference names each once.
    assert set(state) <= set(trained)
    for name, value in state.items():
        np.testing.assert_allclose(trained[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    # Each replica reports its peak memory; the result is gathered as a pipeline's is.
    assert all((tmp_path / f"stage-{k}.json").is_file() for k in range(len(replicas)))
    result = gather(job, tmp_path)
    assert result.exists()


def test_a_data_parallel_run_resumes_from_its_checkpoint(tokens: Path, tmp_path: Path) -> None:
    """A run stopped after its checkpoint at step 6 and resumed there reports the losses
    of an uninterrupted run for the steps after it."""
    from dataclasses import replace

    whole = run_local(_job(tokens, "lora", (2, 2)), tmp_path / "whole")
    first = _job(tokens, "lora", (2, 2), checkpoint_every=6)
    run_local(replace(first, steps=7), tmp_path / "cut")  # the checkpoint of step 6 is kept
    resumed = run_local(replace(first, start_step=6), tmp_path / "cut")
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in whole[6:]], rtol=1e-5
    )

"""Replicated stages at run time: a stage on a group of processes, each taking its share
of every step's micro-batches, computes what one process computes: the same losses step by
step and the same trainable weights at the end (GPT-2's embedding and head, tied across
the first and last stage, each stage replicated), for full training and LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lamc.training.groups import owners
from lamc.training.job import Job
from lamc.training.launch import run_local
from lamc.training.worker import run_reference


def test_micro_batches_are_handed_out_in_turn_by_share() -> None:
    assert owners((4, 4)) == [0, 1, 0, 1, 0, 1, 0, 1]
    assert owners((3, 1)) == [0, 0, 0, 1]  # a tie (a whole share each) to the lower member
    assert owners((8,)) == [0] * 8
    assert sorted(owners((5, 2, 1))) == [0] * 5 + [1] * 2 + [2]


@pytest.mark.parametrize(
    ("method", "groups"),
    [("full", ((3, 1), (2, 2))), ("lora", ((4,), (2, 1, 1)))],
)
def test_replicated_stages_train_as_one_process(
    tmp_path: Path, method: str, groups: tuple[tuple[int, ...], ...]
) -> None:
    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=np.random.default_rng(0).integers(0, 512, size=(32, 12)))
    job = Job(
        model="zoo:gpt2:test",
        method=method,
        data=str(data),
        split_points=("transformer.h.2",),
        devices=tuple(f"cpu{k}" for k in range(sum(len(g) for g in groups))),
        micro_batches=4,
        micro_batch_size=2,
        steps=6,
        lr=0.05,
        optimizer="sgd",
        clip=1.0,
        lora_rank=4,
        lora_targets=("c_attn",),
        stage_groups=groups,
    )
    records = run_local(job, tmp_path / "run")
    losses, state = run_reference(job)
    np.testing.assert_allclose([r["loss"] for r in records], losses, rtol=1e-5)
    from safetensors.numpy import load_file

    trained: dict[str, np.ndarray] = {}
    for stage in range(2):
        trained.update(load_file(str(tmp_path / "run" / f"stage-{stage}.safetensors")))
    # A weight tied across stages is saved once, under the name its owning stage knew it
    # by: GPT-2's head is its embedding.
    tied = {"transformer.wte.weight", "lm_head.weight"}
    assert set(state) - set(trained) <= tied
    for name, value in state.items():
        saved = name if name in trained else next(iter((tied - {name}) & set(trained)))
        np.testing.assert_allclose(trained[saved], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_replicated_stages_resume_from_their_checkpoint(tmp_path: Path) -> None:
    """A stage's first member saves the stage's part of each checkpoint; a run resumed
    from it continues with the losses of the uninterrupted run."""
    import dataclasses

    from lamc.training import checkpoint

    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=np.random.default_rng(1).integers(0, 512, size=(32, 12)))
    job = Job(
        model="zoo:gpt2:test", method="full", data=str(data),
        split_points=("transformer.h.2",), devices=("a", "b", "c"),
        micro_batches=4, micro_batch_size=2, steps=4, lr=0.05, optimizer="sgd",
        checkpoint_every=2, stage_groups=((2, 2), (4,)),
    )  # fmt: skip
    run = tmp_path / "run"
    whole = run_local(job, run)
    assert checkpoint.latest(run) == 2
    assert sorted(p.name for p in checkpoint.step_dir(run, 2).glob("stage-*")) == [
        "stage-0.safetensors",
        "stage-1.safetensors",
    ]
    resumed = run_local(dataclasses.replace(job, start_step=2), run)
    assert [r["step"] for r in resumed] == [2, 3]
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in whole[2:]], rtol=1e-5
    )

"""Per-stage weight slices: the launching host writes each stage's tensors once, and a
stage process builds only a skeleton (the meta device) and loads its own slice, checked
against its sha256. The equivalence of whole runs is in test_pipelined.py; this checks
what each stage holds and what a damaged or foreign slice does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lamc.errors import ExitCode, IntegrityError
from lamc.training import slices
from lamc.training.job import Job, build_module, build_skeleton, load_data
from lamc.training.worker import split_module, write_slices


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    path = tmp_path_factory.mktemp("data") / "tokens.npz"
    np.savez(path, input_ids=np.random.default_rng(0).integers(0, 512, size=(16, 8)))
    return Job(
        model="zoo:gpt2:test",
        method="lora",
        data=str(path),
        split_points=("transformer.h.1", "transformer.h.3"),
        devices=("a", "b", "c"),
        micro_batches=2,
        micro_batch_size=2,
        lora_rank=4,
        lora_targets=("c_attn",),
    )


def _stage(job: Job, rank: int) -> object:
    return split_module(job, build_skeleton(job), load_data(job.data, job.model)).get_stage_module(
        rank
    )


def test_each_stage_loads_its_own_weights_and_nothing_else(job: Job, tmp_path: Path) -> None:
    """A skeleton holds no weight memory; a stage loaded from its slice has exactly the
    tensors of the same stage split from the whole build (names, values, which train),
    and each stage holds less than the whole model."""
    import torch

    write_slices(job, tmp_path)
    listing = json.loads((tmp_path / slices.SLICES / slices.LISTING).read_text())
    assert [e["path"] for e in listing["stages"]] == [slices.stage_file(k) for k in range(3)]
    skeleton = build_skeleton(job)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}

    torch.manual_seed(job.seed)
    whole = split_module(job, build_module(job), load_data(job.data, job.model))
    held = []
    for rank in range(3):
        stage = _stage(job, rank)
        slices.load_into(stage, tmp_path, rank)
        mine = dict(stage.named_parameters())  # type: ignore[attr-defined]
        reference = dict(whole.get_stage_module(rank).named_parameters())
        assert mine.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(mine[name], value), name
            assert mine[name].requires_grad == value.requires_grad, name
        held.append(sum(p.numel() for p in mine.values()))
    everything = sum(p.numel() for p in build_module(job).parameters())
    assert max(held) < everything


def test_a_damaged_or_foreign_slice_is_refused_naming_it(job: Job, tmp_path: Path) -> None:
    write_slices(job, tmp_path)
    relative = slices.stage_file(1)
    path = tmp_path / relative
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError) as info:
        slices.load_into(_stage(job, 1), tmp_path, 1)
    assert info.value.exit_code == ExitCode.INTEGRITY
    assert f"{relative}: sha256" in info.value.message
    path.write_bytes(original[:-4])
    with pytest.raises(IntegrityError, match=f"{relative}: size"):
        slices.load_into(_stage(job, 1), tmp_path, 1)
    path.unlink()
    with pytest.raises(IntegrityError, match=f"{relative}: missing"):
        slices.load_into(_stage(job, 1), tmp_path, 1)
    # Slices written for another split: named, not loaded into the wrong tensors.
    other = tmp_path / "other"
    write_slices(
        dataclasses.replace(job, split_points=("transformer.h.2", "transformer.h.3")), other
    )
    with pytest.raises(IntegrityError, match="written for another split"):
        slices.load_into(_stage(job, 1), other, 1)
    (other / slices.SLICES / slices.LISTING).write_text("{")
    with pytest.raises(IntegrityError, match="no usable listing"):
        slices.load_into(_stage(job, 1), other, 1)


def test_a_hugging_face_checkpoint_builds_its_skeleton_without_reading_weights(
    tmp_path: Path,
) -> None:
    """A checkpoint's skeleton comes from its config alone (on the meta device); a stage of
    it, loaded from its slice, equals the whole build's."""
    import torch

    from tests.training.test_pipelined import _tiny_bert

    _tiny_bert(tmp_path / "bert")
    rng = np.random.default_rng(0)
    data = tmp_path / "labelled.npz"
    np.savez(data, input_ids=rng.integers(1, 200, size=(8, 12)), labels=rng.integers(0, 3, size=8))
    job = Job(
        model=str(tmp_path / "bert"), method="full", data=str(data),
        split_points=("model.bert.encoder.layer.1",), devices=("a", "b"),
        micro_batches=2, micro_batch_size=2, task="classify", labels=3,
    )  # fmt: skip
    assert {p.device.type for p in build_skeleton(job).parameters()} == {"meta"}
    write_slices(job, tmp_path / "run")
    torch.manual_seed(job.seed)
    whole = split_module(job, build_module(job), load_data(job.data, job.model))
    stage = _stage(job, 0)
    slices.load_into(stage, tmp_path / "run", 0)
    mine = dict(stage.named_parameters())  # type: ignore[attr-defined]
    for name, value in whole.get_stage_module(0).named_parameters():
        assert torch.equal(mine[name], value), name
    for name, value in whole.get_stage_module(0).named_buffers():
        assert torch.equal(dict(stage.named_buffers())[name], value), name  # type: ignore[attr-defined]

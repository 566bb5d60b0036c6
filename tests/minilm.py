"""all-MiniLM-L6-v2 on real sentences: the pipeline's sentence embeddings vs transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SENTENCES = Path(__file__).parent / "data" / "sentences.txt"
CALIBRATION = Path(__file__).parent / "data" / "calibration.txt"


def checkpoint() -> Path | None:
    from lamc.models.bert import minilm_checkpoint

    return minilm_checkpoint()


def sentences(path: Path = SENTENCES) -> list[str]:
    return [s for s in path.read_text().splitlines() if s.strip()]


def tokenize(texts: list[str], path: Path) -> list[dict[str, np.ndarray]]:
    """One request per sentence, tokenised by the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    feeds = []
    for text in texts:
        enc = tokenizer(text, return_tensors="np")
        feeds.append({k: np.asarray(v, dtype=np.int64) for k, v in enc.items()})
    return feeds


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def reference(feeds: list[dict[str, np.ndarray]], path: Path) -> np.ndarray:
    """Sentence embeddings from the fp32 transformers model."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path)).eval()
    rows = []
    with torch.no_grad():
        for f in feeds:
            out = model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state
            rows.append(mean_pool(out.numpy(), f["attention_mask"])[0])
    return np.stack(rows)


def embed(pipeline: object, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    rows = []
    for f in feeds:
        hidden = pipeline.run(f)["last_hidden_state"]  # type: ignore[attr-defined]
        rows.append(mean_pool(hidden, f["attention_mask"])[0])
    return np.stack(rows)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

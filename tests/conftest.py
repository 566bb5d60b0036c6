"""Shared fixtures: each model is captured and analysed once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from lamc.compiler import Analysed, analyse
from lamc.frontend import CaptureOptions

os.environ.setdefault("CI", "true")

ZOO_TEST = ["zoo:gpt2:test", "zoo:llama:test", "zoo:vit:test", "zoo:resnet:test", "zoo:bert:test"]
_ANALYSED: dict[tuple[str, bool], Analysed] = {}


def analysed_model(ref: str, *, weights: bool = True) -> Analysed:
    """Capture + analysis of `ref`, cached for the session. Do not mutate the result."""
    key = (ref, weights)
    if key not in _ANALYSED:
        _ANALYSED[key] = analyse(ref, CaptureOptions(weights=weights))
    return _ANALYSED[key]


@pytest.fixture(scope="session")
def analysed() -> Callable[..., Analysed]:
    return analysed_model


# The suite runs on two pytest-xdist workers, a file at a time (`make test`). Files are
# handed out in the order collected, so the longest go first: otherwise one worker can be
# left running a long training file alone at the end. tests/durations.json holds each
# file's seconds from a full run (`scripts/test_durations.py junit.xml`); a file it does
# not list goes after those it does, in collection order.
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import json
    from pathlib import Path

    table = Path(__file__).with_name("durations.json")
    try:
        seconds: dict[str, float] = json.loads(table.read_text())
    except (OSError, ValueError):
        return
    root = Path(__file__).resolve().parent.parent

    def weight(item: pytest.Item) -> float:
        try:
            where = Path(str(item.path)).resolve().relative_to(root).as_posix()
        except ValueError:
            return 0.0
        return float(seconds.get(where, 0.0))

    items.sort(key=lambda item: -weight(item))

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

"""End to end on realistic models: gpt2-small in 3 stages, ResNet-50 in 2, against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lamc.frontend import random_inputs
from lamc.runtime.executor import Pipeline
from tests.compiled import compile_zoo
from tests.conftest import analysed_model


@pytest.mark.slow
@pytest.mark.parametrize(("ref", "stages"), [("zoo:gpt2", 3), ("zoo:resnet", 2)])
def test_realistic_model_pipeline_matches_torch(ref: str, stages: int, tmp_path: Path) -> None:
    result = compile_zoo(ref, tmp_path / "out", stages)
    assert len(result.manifest.stages) == stages
    captured = analysed_model(ref).captured
    pipeline = Pipeline.open(result.out)
    feeds = random_inputs(captured, captured.operating_point, np.random.default_rng(5))
    got = pipeline.run(feeds)
    assert captured.reference is not None
    for name, want in captured.reference(feeds).items():
        np.testing.assert_allclose(got[name], want, atol=1e-4, rtol=0, err_msg=name)

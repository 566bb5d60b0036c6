"""compile -> run: every zoo model, split 1 to 4 ways, computes what torch computes."""

from __future__ import annotations

import numpy as np
import pytest

from lamc.frontend import random_inputs
from lamc.runtime.executor import Pipeline
from tests.compiled import compile_zoo
from tests.conftest import ZOO_TEST, analysed_model


def _check_against_torch(ref: str, out: object, binding: dict[str, int] | None = None) -> None:
    captured = analysed_model(ref).captured
    pipeline = Pipeline.open(out)  # type: ignore[arg-type]
    rng = np.random.default_rng(11)
    bindings = [
        captured.operating_point,
        binding or {k: min(v[1], 5) for k, v in captured.dims.items()},
    ]
    for b in bindings:
        feeds = random_inputs(captured, b, rng)
        got = pipeline.run(feeds)
        assert captured.reference is not None
        for name, want in captured.reference(feeds).items():
            np.testing.assert_allclose(
                got[name], want, atol=1e-4, rtol=0, err_msg=f"{ref} {name} at {b}"
            )


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("ref", ZOO_TEST)
def test_zoo_pipeline_matches_torch(ref: str, stages: int, tmp_path: object) -> None:
    result = compile_zoo(ref, tmp_path / "out", stages)  # type: ignore[operator]
    assert len(result.manifest.stages) == stages
    _check_against_torch(ref, result.out)


def test_cut_across_resnet_skip_connections(tmp_path: object) -> None:
    """Fine units cut inside a bottleneck: the identity path crosses the cut with the
    conv output, and the stages still compute ResNet exactly."""
    result = compile_zoo(
        "zoo:resnet:test",
        tmp_path / "out",
        3,
        split_after=("layer1.0.bn2", "layer3.0.bn1"),
        granularity="fine",
    )  # type: ignore[operator]
    manifest = result.manifest
    crossing = [len(s.sends) for s in manifest.stages[:-1]]
    assert crossing[0] >= 2, manifest.stages[0].sends  # the skip and the main path
    _check_against_torch("zoo:resnet:test", result.out)


def test_long_skip_forwarded_through_a_middle_stage(tmp_path: object) -> None:
    """A tensor produced in stage 0 and used in stage 2 passes through stage 1 untouched."""
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints
    from tests.compiled import MINIPCS

    ref = "tests.data.user_models:long_skip_factory"
    analysed = analysed_model(ref)
    # Stages: blocks.0 | blocks.1 | blocks.2 | add + blocks.3. blocks.0's output is
    # consumed by blocks.1 and by the add: stage 2 (blocks.2) only forwards it.
    request = PlanRequest(constraints=Constraints(split_after=("blocks.0", "blocks.1", "blocks.2")))
    result = compile_model(
        ref, MINIPCS, tmp_path / "out", CompileOptions(request=request), analysed=analysed
    )  # type: ignore[operator]
    middle = result.manifest.stages[2]
    forwarded = set(middle.sends) - set(middle.outputs)
    assert forwarded and not forwarded & set(middle.inputs), (middle.inputs, middle.sends)
    _check_against_torch(ref, result.out)

"""TagStages, Before/Expected: every node gets the stage of its unit, as lamc's annotation
and as ONNX's own multi-device pipeline-stage annotation."""

from __future__ import annotations

import pytest

from lamc.errors import InternalError
from lamc.ir import STAGE, annotation
from lamc.passes.base import PassManager
from lamc.passes.partition.tag import TagStages
from tests.structural import mlp_with_skip, plan_of


def test_tags_follow_the_plan() -> None:
    before = mlp_with_skip(units=4)
    plan = plan_of([("a", 0, 1), ("b", 1, 4)])
    result = PassManager([TagStages(plan, 4)]).run(before)
    assert result.modified
    expected = {
        "mm0": 0,
        "relu0": 0,
        "mm1": 1,
        "relu1": 1,
        "mm2": 1,
        "relu2": 1,
        "mm3": 1,
        "relu3": 1,
        "skip": 1,
    }
    assert {n.name: annotation(n, STAGE) for n in result.model.graph} == expected
    (config,) = result.model.device_configurations
    assert config.device_names == ("a", "b")


def test_a_plan_leaving_a_unit_out_is_an_internal_error() -> None:
    with pytest.raises(InternalError, match="without a stage"):
        TagStages(plan_of([("a", 0, 2)]), 4)


def test_tags_show_in_dumped_ir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = mlp_with_skip(units=3)
    PassManager([TagStages(plan_of([("a", 0, 2), ("b", 2, 3)]), 3)], dump_ir=tmp_path, first=3).run(
        model
    )
    dumped = (tmp_path / "03-TagStages.lamc.json").read_text()
    assert '"lamc.stage": 1' in dumped and not (tmp_path / "00-input.onnxtxt").exists()

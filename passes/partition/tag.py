"""Tag every node with its pipeline stage. The partitioner only tags; backends compile.

Tags are lamc's `lamc.stage` annotation and ONNX's own multi-device annotation (a
`ModelConfiguration` naming the plan's devices, one pipeline stage per node), so a dumped
IR carries its placement in a standard form.
"""

from __future__ import annotations

import onnx_ir as ir

from lamc.errors import InternalError
from lamc.ir import STAGE, UNIT, annotate, annotation
from lamc.passes.base import Pass, PassResult
from lamc.plan import Plan


def unit_stages(plan: Plan, n_units: int) -> list[int]:
    """Stage of every unit, from the plan's stages (ranges of the pipeline order, or a
    branch-parallel plan's unit sets)."""
    stages = [-1] * n_units
    for stage in plan.stages:
        for u in stage.unit_set:
            if stages[u] != -1:
                raise InternalError(f"the plan puts unit {u} on two stages")
            stages[u] = stage.index
    if -1 in stages:
        raise InternalError("the plan leaves a unit without a stage")
    return stages


class TagStages(Pass):
    def __init__(self, plan: Plan, n_units: int) -> None:
        super().__init__()
        self.plan = plan
        self.stage_of_unit = unit_stages(plan, n_units)

    def call(self, model: ir.Model) -> PassResult:
        name = f"lamc:{self.plan.topology}"
        for old in list(model.device_configurations):
            if old.name == name:
                model.remove_device_configuration(old)
        config = model.add_device_configuration(
            name,
            num_devices=len(self.plan.stages),
            device_names=tuple(s.device for s in self.plan.stages),
        )
        for node in model.graph:
            unit = annotation(node, UNIT)
            if unit is None:
                raise InternalError(f"node {node.name} has no unit")
            stage = self.stage_of_unit[unit]
            annotate(node, STAGE, stage)
            node.set_pipeline_stage(config, stage)
        return PassResult(model, modified=True)

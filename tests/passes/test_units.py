"""Units: repeated blocks plus the glue between them; cuts hold every live tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from lamc.backends.onnxruntime.run import new_session
from lamc.compiler import analyse
from lamc.frontend import random_inputs
from lamc.frontend.torch import capture_spec
from lamc.models import Dim, ModelSpec
from tests.conftest import analysed_model


def test_gpt2_test_units() -> None:
    units = analysed_model("zoo:gpt2:test").workload.units
    assert [u.name for u in units] == [
        "transformer.wte+transformer.wpe",
        *[f"transformer.h.{i}" for i in range(4)],
        "transformer.ln_f+lm_head",
    ]
    assert [u.kind for u in units] == ["glue", "block", "block", "block", "block", "glue"]
    assert {u.module_class for u in units if u.kind == "block"} == {"GPT2Block"}


def test_resnet_test_units() -> None:
    units = analysed_model("zoo:resnet:test").workload.units
    assert len(units) == 6
    assert [u.name for u in units[1:5]] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert units[0].kind == units[-1].kind == "glue"


@pytest.mark.slow
def test_gpt2_small_is_embedding_12_blocks_head() -> None:
    units = analysed_model("zoo:gpt2").workload.units
    assert len(units) == 14
    assert units[0].name == "transformer.wte+transformer.wpe"
    assert [u.name for u in units[1:13]] == [f"transformer.h.{i}" for i in range(12)]
    assert units[13].name == "transformer.ln_f+lm_head"


@pytest.mark.slow
def test_resnet50_is_stem_16_bottlenecks_head() -> None:
    units = analysed_model("zoo:resnet").workload.units
    assert len(units) == 18
    assert [u.module_class for u in units[1:17]] == ["Bottleneck"] * 16
    assert units[0].kind == "glue" and units[17].kind == "glue"


def _really_crossing_bytes(ref: str, tmp_path: Path) -> list[int]:
    """Run the IR with every cut tensor exposed and sum the arrays' real sizes."""
    result = analysed_model(ref)
    workload, captured = result.workload, result.captured
    proto = ir.to_proto(captured.model)
    names = {t.name for cut in workload.cuts for t in cut.tensors}
    existing = {o.name for o in proto.graph.output}
    for name in sorted(names - existing - {i.name for i in proto.graph.input}):
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    path = tmp_path / "exposed.onnx"
    onnx.save(proto, str(path))
    session = new_session(str(path))
    feeds = random_inputs(captured, workload.binding, np.random.default_rng(0))
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    values.update(feeds)
    return [sum(values[t.name].nbytes for t in cut.tensors) for cut in workload.cuts]


@pytest.mark.parametrize("ref", ["zoo:resnet:test", "zoo:gpt2:test", "zoo:bert:test"])
def test_cut_bytes_equal_the_tensors_that_really_cross(ref: str, tmp_path: Path) -> None:
    workload = analysed_model(ref).workload
    assert [c.bytes for c in workload.cuts] == _really_crossing_bytes(ref, tmp_path)
    assert all(c.bytes > 0 for c in workload.cuts)


class _LongSkip(nn.Module):
    """Block 0's output is added back after block 2: a skip connection spanning units."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.blocks[0](x)
        y = self.blocks[2](self.blocks[1](first)) + first
        return self.blocks[3](y)


def test_cut_counts_skip_connections_across_units() -> None:
    spec = ModelSpec(
        module=_LongSkip().eval(),
        example_inputs={"x": torch.randn(2, 16)},
        dynamic={"x": {0: Dim("batch", 1, 8)}},
    )
    captured = capture_spec(spec, source="long-skip")
    workload = analyse("long-skip", captured=captured).workload
    names = [u.name for u in workload.units]
    # The skip's add runs at the top level, so it is a glue unit of its own.
    assert names == ["blocks.0", "blocks.1", "blocks.2", "glue", "blocks.3"]
    row = 2 * 16 * 4  # batch 2 x 16 floats
    # Until the add, both the running value and the skip from blocks.0 are live.
    assert [len(c.tensors) for c in workload.cuts] == [1, 1, 2, 2, 1, 1]
    assert [c.bytes for c in workload.cuts] == [row, row, 2 * row, 2 * row, row, row]


def test_unit_totals_cover_the_graph() -> None:
    result = analysed_model("zoo:llama:test")
    workload = result.workload
    summary = result.captured.model.meta["lamc.analysis"]
    assert sum(u.nodes for u in workload.units) == summary.nodes
    # Constant-only nodes are folded at load time: they count as nodes but not as work per run.
    from lamc.ir import CONST, COST, annotation

    folded = sum(
        annotation(n, COST).flops for n in result.captured.model.graph if annotation(n, CONST)
    )
    assert workload.flops == pytest.approx(summary.flops - folded)
    assert workload.dag().number_of_nodes() == len(workload.units)
    import networkx as nx

    assert nx.is_directed_acyclic_graph(workload.dag())

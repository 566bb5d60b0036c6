"""The slicer, Before/Expected: it reads the stage tags and nothing else; each stage model
holds its own nodes and weights; a tensor a later stage needs is an output of the stage
that makes it (a skip connection included)."""

from __future__ import annotations

import pytest

from lamc.backends.slice import slice_stages
from lamc.errors import InternalError
from lamc.ir import STAGE, UNIT, annotate
from tests.structural import mlp_with_skip, summary


def _tagged(stages: dict[int, int], units: int = 4):  # type: ignore[no-untyped-def]
    model = mlp_with_skip(units=units)
    for node in model.graph:
        annotate(node, STAGE, stages[node.meta[UNIT]])
    return model


def test_two_stages_with_a_skip_connection() -> None:
    graphs = slice_stages(_tagged({0: 0, 1: 0, 2: 1, 3: 1}))
    got = [
        summary(g.view, g.view.inputs, g.view.outputs, g.view.initializers.values()) for g in graphs
    ]
    expected = [
        {
            "nodes": [("MatMul", "mm0"), ("Relu", "relu0"), ("MatMul", "mm1"), ("Relu", "relu1")],
            "inputs": ["x"],
            "outputs": ["h0", "h1"],  # h0 feeds the skip in stage 1
            "weights": [("w0", "FLOAT"), ("w1", "FLOAT")],
        },
        {
            "nodes": [
                ("MatMul", "mm2"),
                ("Relu", "relu2"),
                ("MatMul", "mm3"),
                ("Relu", "relu3"),
                ("Add", "skip"),
            ],
            "inputs": ["h1", "h0"],
            "outputs": ["y"],
            "weights": [("w2", "FLOAT"), ("w3", "FLOAT")],
        },
    ]
    assert got == expected


def test_the_slicer_reads_tags_not_units() -> None:
    # Units 0-3, but the tags put unit 1 in stage 1: the tags win.
    graphs = slice_stages(_tagged({0: 0, 1: 1, 2: 1, 3: 1}))
    assert [n.name for n in graphs[0].view] == ["mm0", "relu0"]


def test_untagged_node_is_an_internal_error() -> None:
    model = mlp_with_skip(units=2)
    with pytest.raises(InternalError, match="no stage tag"):
        slice_stages(model)


def test_a_stage_number_without_nodes_is_an_internal_error() -> None:
    with pytest.raises(InternalError, match="have no node"):
        slice_stages(_tagged({0: 0, 1: 2}, units=2))

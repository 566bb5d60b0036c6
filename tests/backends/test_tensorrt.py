"""The TensorRT backend on a machine with TensorRT and a GPU (skipped elsewhere: its build
is checked by mypy against tensorrt-stubs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamc.backends.tensorrt.build import TensorRTBackend, is_available

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(
        not is_available(),
        reason="needs the tensorrt package and an NVIDIA GPU (TensorRT cannot be installed here)",
    ),
]


def test_builds_an_engine_for_a_stage(tmp_path: Path) -> None:
    from lamc.backends.slice import slice_stages
    from lamc.ir import STAGE, annotate
    from lamc.topology import parse_topology
    from tests.structural import mlp_with_skip

    model = mlp_with_skip(units=2)
    for node in model.graph:
        annotate(node, STAGE, 0)
    (stage,) = slice_stages(model)
    topology = parse_topology(
        "lamc_topology: 1\nname: gpu\ndevices:\n"
        "  - {name: g, kind: gpu, memory: 8GiB, peak: {fp32: 10TFLOPS}, memory_bandwidth: 100GB/s, backends: [tensorrt]}\n"
    )
    artifact = TensorRTBackend().build(stage, topology.device("g"), tmp_path, check=True)
    assert artifact.model == "stage-0/model.engine"
    assert (tmp_path / "stage-0" / "model.engine").stat().st_size > 0

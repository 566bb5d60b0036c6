"""Planning a decoder for a context length: each stage holds the KV cache of its layers."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamc.errors import DoesNotFitError
from lamc.passes.partition.planner import PlanRequest, plan
from lamc.topology import load_topology
from tests.conftest import analysed_model

MODEL = "zoo:llama:test,kv=1,context=32768"
TOPOLOGY = """\
lamc_topology: 1
name: two-6mib-boards
devices:
  - {name: a, host: a, kind: cpu, memory: 6MiB, runtime_memory: 0B, peak: {fp32: 20GFLOPS}, memory_bandwidth: 4GB/s}
  - {name: b, host: b, kind: cpu, memory: 6MiB, runtime_memory: 0B, peak: {fp32: 20GFLOPS}, memory_bandwidth: 4GB/s}
links:
  - {a: a, b: b, bandwidth: 100Mbit/s, latency: 1ms}
"""


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> object:
    path: Path = tmp_path_factory.mktemp("kv") / "t.yaml"
    path.write_text(TOPOLOGY)
    return load_topology(path)


def test_kv_bytes_are_charged_to_each_layers_unit() -> None:
    workload = analysed_model(MODEL).workload
    per_token = {u.name: u.kv_bytes_per_token for u in workload.units if u.kv_bytes_per_token}
    # 4 layers x (key + value) x 2 KV heads x head_dim 16 x 4 bytes
    assert list(per_token.values()) == [2 * 2 * 16 * 4] * 4, per_token
    assert all(name.startswith("model.layers.") for name in per_token)


def test_fits_one_device_at_512_must_split_at_8192_and_refuses_at_32768(topology: object) -> None:
    workload = analysed_model(MODEL).workload
    short, _ = plan(workload, topology, PlanRequest(objective="latency", kv_tokens=512))  # type: ignore[arg-type]
    assert len(short.stages) == 1
    assert short.stages[0].kv_bytes == 512 * 1024
    long, _ = plan(workload, topology, PlanRequest(objective="latency", kv_tokens=8192))  # type: ignore[arg-type]
    assert len(long.stages) == 2
    assert sum(s.kv_bytes for s in long.stages) == 8192 * 1024
    assert all(s.memory_bytes <= s.capacity_bytes for s in long.stages)
    with pytest.raises(DoesNotFitError) as info:
        plan(workload, topology, PlanRequest(objective="latency", kv_tokens=32768))  # type: ignore[arg-type]
    assert info.value.exit_code == 6
    assert "32.00 MiB of KV cache" in str(info.value)


def test_manifest_records_each_stages_kv_ownership(tmp_path: Path) -> None:
    from lamc.driver import CompileOptions, compile_model
    from lamc.topology import Constraints
    from tests.compiled import MINIPCS

    model = "zoo:gpt2:test,kv=1"
    request = PlanRequest(constraints=Constraints(stages=2), kv_tokens=128, context=128)
    result = compile_model(
        model,
        MINIPCS,
        tmp_path / "out",
        CompileOptions(request=request),
        analysed=analysed_model(model),
    )
    from lamc.manifest import read_manifest

    manifest = read_manifest(tmp_path / "out")
    owned = [s.kv_cache for s in manifest.stages]
    assert all(k is not None for k in owned)
    layers = [layer for k in owned for layer in k.layers]  # type: ignore[union-attr]
    assert sorted(layers) == [0, 1, 2, 3]  # every layer's cache on exactly one stage
    for stage, kv in zip(manifest.stages, owned, strict=True):
        assert kv is not None
        assert set(kv.past_inputs) <= set(stage.inputs)
        assert set(kv.present_outputs) <= set(stage.outputs)
        assert len(kv.past_inputs) == len(kv.present_outputs) == 2 * len(kv.layers)
        assert kv.bytes_per_token == len(kv.layers) * 2 * 4 * 16 * 4  # 4 heads x 16 dims, fp32
        assert kv.max_context == 128 and kv.dtype == "float32"
    assert result.plan.stages[0].kv_bytes > 0

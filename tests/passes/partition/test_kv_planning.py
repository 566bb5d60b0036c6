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
    from lamc.compiler import CompileOptions, compile_model
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
    from lamc.verify import read_manifest

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


ONE_LINK = """\
lamc_topology: 1
name: two-boards-2ms
devices:
  - {name: a, host: a, kind: cpu, memory: 64MiB, runtime_memory: 0B, peak: {fp32: 20GFLOPS}, memory_bandwidth: 4GB/s}
  - {name: b, host: b, kind: cpu, memory: 64MiB, runtime_memory: 0B, peak: {fp32: 20GFLOPS}, memory_bandwidth: 4GB/s}
links:
  - {a: a, b: b, bandwidth: 100Mbit/s, latency: 2ms}
"""


def test_generate_objective_does_not_split_when_splitting_slows_decoding(
    tmp_path: Path,
) -> None:
    """Two equal boards joined by a 2 ms link. For pipelined requests splitting pays
    (throughput); for generating tokens one at a time every step would cross the link,
    so the plan keeps one stage and says what two would cost."""
    from lamc.compiler import decode_workload

    path = tmp_path / "t.yaml"
    path.write_text(ONE_LINK)
    topology = load_topology(path)
    analysed = analysed_model(MODEL)
    split, _ = plan(analysed.workload, topology, PlanRequest(kv_tokens=256))
    assert len(split.stages) == 2  # throughput: two stages beat one
    step = decode_workload(analysed, 256)
    assert step.binding["seq"] == 1 and step.binding["past"] == 128
    assert [u.name for u in step.units] == [u.name for u in analysed.workload.units]
    request = PlanRequest(objective="generate", kv_tokens=256, decode=step, new_tokens=64)
    whole, _ = plan(analysed.workload, topology, request)
    assert len(whole.stages) == 1
    g = whole.generation
    assert g["total_ms"] == pytest.approx(g["prefill_ms"] + 64 * g["decode_ms_per_token"])
    (why,) = g["why"]
    assert why.startswith("2 stage(s) would be slower: decode")
    two_decode = float(why.split("decode ")[1].split(" ms/token")[0])
    # Each decode step of the split would add the link's 2 ms (and the hidden state's transfer).
    assert two_decode > g["decode_ms_per_token"] + 2.0
    # Caches stay in their stages: no link is charged for them.
    assert all(t.startswith(("past.", "present.")) for t in analysed.workload.resident)
    cut = analysed.workload.cuts[split.stages[0].end_unit]
    resident = [t for t in cut.tensors if t.name in analysed.workload.resident]
    assert resident  # the cut lists cache tensors (they pass through in the graph) ...
    moving = sum(t.bytes for t in cut.tensors if t.name not in analysed.workload.resident)
    assert split.stages[0].transfer_bytes == moving  # ... but only the rest is charged


def test_generate_objective_splits_when_one_device_cannot_hold_the_cache(
    topology: object,
) -> None:
    from lamc.compiler import decode_workload

    analysed = analysed_model(MODEL)
    request = PlanRequest(
        objective="generate", kv_tokens=8192, decode=decode_workload(analysed, 8192)
    )
    best, _ = plan(analysed.workload, topology, request)  # type: ignore[arg-type]
    assert len(best.stages) == 2
    assert best.generation["why"] == ["no plan with 1 stage(s) fits the devices and constraints"]


def test_plan_command_picks_generate_for_a_decoder_and_says_why(tmp_path: Path) -> None:
    from tests.cli.helpers import lamc

    path = tmp_path / "t.yaml"
    path.write_text(ONE_LINK)
    out = lamc("plan", "zoo:llama:test,kv=1", "-t", str(path), "--context", "256")
    assert out.code == 0, out.stderr
    assert "generation: prefill" in out.stdout + out.stderr
    assert "why 1 stage(s): 2 stage(s) would be slower" in out.stdout + out.stderr
    out = lamc(
        "plan",
        "zoo:llama:test,kv=1",
        "-t",
        str(path),
        "--context",
        "256",
        "--objective",
        "throughput",
    )
    assert out.code == 0 and "generation:" not in out.stdout + out.stderr
    out = lamc("plan", "zoo:gpt2:test", "-t", str(path), "--objective", "generate")
    assert out.code == 2 and "needs a decoder captured with its KV cache" in out.stdout + out.stderr

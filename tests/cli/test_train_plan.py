"""`lamc train --dry-run`: the training plan over a topology, and the baselines beside it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from lamc.compiler.training import TrainingOptions, plan_training
from lamc.errors import ConfigError
from lamc.passes.partition.dp import Segment
from lamc.passes.partition.training import brute_force
from lamc.topology import load_topology
from lamc.training_cost import TrainingSpec
from tests.cli.helpers import lamc
from tests.compiled import MINIPCS
from tests.conftest import analysed_model

MODEL = "zoo:gpt2:test"


@pytest.mark.parametrize("method", ["lora", "prompt", "full"])
def test_dry_run_prints_the_plan_and_beats_every_pipeline_baseline(method: str) -> None:
    outcome = lamc(
        "train", MODEL, "-t", str(MINIPCS), "--method", method, "--dry-run", "--compare", "--json"
    )
    assert outcome.code == 0, outcome.stderr
    data = json.loads(outcome.stdout)
    assert data["method"] == method and data["stages"]
    stages = data["stages"]
    # 1F1B: the stage r from the end keeps min(m, r) micro-batches.
    assert [s["micro_batches_kept"] for s in stages] == [
        min(8, len(stages) - k) for k in range(len(stages))
    ]
    for stage in stages:
        memory = stage["memory_bytes"]
        parts = ("frozen", "trainable", "gradients", "optimiser", "activations", "runtime")
        assert memory["total"] == pytest.approx(sum(memory[p] for p in parts))
        assert memory["total"] <= memory["capacity"]
        assert memory["optimiser"] == 2 * memory["trainable"] == 2 * memory["gradients"]
        if method == "lora":  # adapters are a sliver of the weights they adapt
            assert memory["trainable"] < 0.2 * memory["frozen"]
    names = [b["name"] for b in data["compare"]]
    assert names == ["equal split", "memory-proportional", "one device", "data parallel"]
    for baseline in data["compare"][:3]:  # pipelines: the exact search covers them
        assert baseline["step_ms"] is None or baseline["step_ms"] >= data["step_ms"] * (1 - 1e-9)


def test_trainable_parameters_follow_the_method() -> None:
    analysed = analysed_model(MODEL)
    topology = load_topology(MINIPCS)
    plans = {
        m: plan_training(analysed, topology, TrainingOptions(TrainingSpec(m), lora_rank=4))
        for m in ("lora", "prompt", "full")
    }
    import torch

    module = analysed.captured.reference.module  # type: ignore[union-attr]
    every = sum(p.numel() for p in module.parameters())  # tied weights once
    assert plans["full"].trainable_params == every
    # LoRA on GPT-2's c_attn (Conv1D, in x 3*in): rank x (in + out) per layer.
    c_attn = [m for n, m in module.named_modules() if n.endswith("c_attn")]
    expected = sum(4 * (m.weight.shape[0] + m.weight.shape[1]) for m in c_attn)
    assert plans["lora"].trainable_params == expected and plans["lora"].targets == ("c_attn",)
    width = next(m for m in module.modules() if isinstance(m, torch.nn.Embedding)).embedding_dim
    assert plans["prompt"].trainable_params == 20 * width
    # Full training costs more than adapters: the weights' gradients and the optimiser.
    assert plans["full"].solution.step_ms > plans["lora"].solution.step_ms  # type: ignore[union-attr]


def test_the_plan_equals_brute_force_on_the_real_tables() -> None:
    analysed = analysed_model(MODEL)
    topology = load_topology(MINIPCS)
    plan = plan_training(analysed, topology, TrainingOptions(TrainingSpec("full", 4)))
    expected = brute_force(plan.problem)
    assert plan.solution is not None and expected is not None
    assert plan.solution.step_ms == pytest.approx(expected.step_ms, rel=1e-9)
    # The reported step time is the cost model's, stage by stage.
    cost, segments = plan.cost, plan.solution.segments
    works = [cost.work_ms(s.device, s.start, s.end) for s in segments]
    links = [cost.link_ms(a.device, b.device, a.end) for a, b in itertools.pairwise(segments)]
    first = segments[0]
    step = (
        sum(works)
        + sum(links)
        + 3 * max(works + links)
        + cost.update_ms(first.device, first.start, first.end)
    )
    assert plan.solution.step_ms == pytest.approx(step, rel=1e-9)


def test_too_little_memory_is_no_fit_and_baselines_say_why(tmp_path: Path) -> None:
    text = Path(MINIPCS).read_text().replace("memory: 12GiB", "memory: 256.25MiB")
    assert text != Path(MINIPCS).read_text()
    small = tmp_path / "small.yaml"
    small.write_text(text)
    outcome = lamc("train", MODEL, "-t", str(small), "--method", "full", "--dry-run", "--compare")
    assert outcome.code == 6, outcome.stdout + outcome.stderr
    assert "no pipeline holds the full training state" in outcome.final
    assert "does not fit" in outcome.stdout


def test_without_dry_run_and_with_unknown_targets_it_says_why() -> None:
    outcome = lamc("train", MODEL, "-t", str(MINIPCS))
    assert outcome.code == 2 and "needs --data DATA.npz and -o RUN" in outcome.final
    outcome = lamc("train", MODEL, "-t", str(MINIPCS), "--dry-run", "--lora-targets", "nope")
    assert outcome.code == 2 and "no Linear module named nope" in outcome.final


def test_data_parallel_shares_follow_speed() -> None:
    from lamc.passes.partition.training_baselines import _shares

    assert _shares([1.0, 1.0], 8) == [4, 4]
    assert _shares([1.0, 3.0], 8) == [6, 2]
    assert sum(_shares(list(np.linspace(1, 4, 5)), 11)) == 11
    assert Segment(0, 0, 1).end == 1


def test_the_plan_says_when_data_parallelism_beats_every_pipeline() -> None:
    """LoRA on a tiny model over four equal devices: no weight gradients to all-reduce
    to speak of, so replicas beat a pipeline's fill and drain."""
    analysed = analysed_model(MODEL)
    topology = load_topology(MINIPCS)
    plan = plan_training(analysed, topology, TrainingOptions(TrainingSpec("lora")), compare=True)
    everywhere = next(b for b in plan.baselines if b.name == "data parallel")
    assert plan.solution is not None
    assert everywhere.step_ms < plan.solution.step_ms
    assert plan.replicated is not None and plan.replicated.step_ms == everywhere.step_ms
    outcome = lamc("train", MODEL, "-t", str(MINIPCS), "--dry-run", "--json")
    data = json.loads(outcome.stdout)
    assert data["choice"] == "data parallel"
    assert data["data_parallel_step_ms"] == pytest.approx(everywhere.step_ms)
    # Full training moves every weight's gradient: there the pipeline wins.
    full = plan_training(analysed, topology, TrainingOptions(TrainingSpec("full")))
    assert full.replicated is None


def test_a_training_stage_is_charged_the_training_runtime(tmp_path: Path) -> None:
    """A training stage process is torch with its libraries, not an inference runtime: the
    plan charges the device's `training_runtime_memory` (448 MiB by default on a CPU), and
    a device too small for it holds no stage."""
    analysed = analysed_model(MODEL)
    devices = [
        ("roomy", "2GiB", ""),
        ("declared", "2GiB", ", training_runtime_memory: 600MiB"),
        ("small", "400MiB", ""),  # room for inference (256 MiB), not for training
    ]
    text = "lamc_topology: 1\nname: t\ndevices:\n" + "".join(
        f"  - {{name: {n}, host: {n}, kind: cpu, memory: {m}, peak: {{fp32: 50GFLOPS}}, "
        f"memory_bandwidth: 20GB/s{extra}}}\n"
        for n, m, extra in devices
    )
    text += "links:\n  - {a: roomy, b: declared, bandwidth: 1Gbit/s, latency: 0.2ms}\n"
    text += "  - {a: roomy, b: small, bandwidth: 1Gbit/s, latency: 0.2ms}\n"
    path = tmp_path / "t.yaml"
    path.write_text(text)
    topology = load_topology(path)
    plan = plan_training(analysed, topology, TrainingOptions(TrainingSpec("lora")))
    cost = plan.cost
    n = cost.n
    runtimes = [cost.memory(d, 0, n, 1).runtime for d in range(3)]
    assert runtimes == [448 * 2**20, 600 * 2**20, 448 * 2**20]
    assert cost.memory(2, 0, n, 1).total > cost.memory(2, 0, n, 1).capacity
    assert plan.solution is not None
    assert all(cost.devices[s.device].name != "small" for s in plan.solution.segments)


def test_a_pipeline_schedule_overhead_is_charged_to_stages_not_to_replicas(
    tmp_path: Path,
) -> None:
    """`training_schedule_overhead`: what a pipeline schedule spends per micro-batch of a
    stage, besides the compute. Every stage's work carries it; a data-parallel replica,
    plain training, does not."""
    from lamc.passes.partition.training_baselines import data_parallel

    analysed = analysed_model(MODEL)
    plans = []
    for extra in ("", ", training_schedule_overhead: 7ms"):
        text = "lamc_topology: 1\nname: t\ndevices:\n" + "".join(
            f"  - {{name: {n}, host: {n}, kind: cpu, memory: 4GiB, peak: {{fp32: 50GFLOPS}}, "
            f"memory_bandwidth: 20GB/s{extra}}}\n"
            for n in ("a", "b")
        )
        text += "links:\n  - {a: a, b: b, bandwidth: 1Gbit/s, latency: 0.2ms}\n"
        path = tmp_path / "t.yaml"
        path.write_text(text)
        plans.append(
            plan_training(analysed, load_topology(path), TrainingOptions(TrainingSpec("lora")))
        )
    bare, charged = plans
    n = bare.cost.n
    assert charged.problem.work[0, 0, n] == pytest.approx(bare.problem.work[0, 0, n] + 7.0)
    assert charged.problem.work[1, 2, 5] == pytest.approx(bare.problem.work[1, 2, 5] + 7.0)
    replicas = [data_parallel(p.cost, p.problem) for p in plans]
    assert replicas[1].step_ms == pytest.approx(replicas[0].step_ms)
    # A bad value names the field.
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("7ms", "seven"))
    with pytest.raises(ConfigError, match="training_schedule_overhead"):
        load_topology(path)

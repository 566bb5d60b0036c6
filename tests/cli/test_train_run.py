"""`lamc train --data D.npz -o RUN`: a run on stage processes here, written atomically;
bad data, a method that cannot run yet, and a stage that dies each say why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli.helpers import lamc

MODEL = "zoo:gpt2:test"
TWO = """lamc_topology: 1
name: two-cpus
devices:
  - {name: cpu0, host: cpu0, kind: cpu, memory: 4GiB, peak: {fp32: 50GFLOPS}, memory_bandwidth: 20GB/s}
  - {name: cpu1, host: cpu1, kind: cpu, memory: 4GiB, peak: {fp32: 50GFLOPS}, memory_bandwidth: 20GB/s}
links:
  - {a: cpu0, b: cpu1, bandwidth: 1Gbit/s, latency: 0.2ms}
"""


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path]:
    topology = tmp_path / "two.yaml"
    topology.write_text(TWO)
    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=np.random.default_rng(0).integers(0, 512, size=(32, 16)))
    return topology, data


def _train(topology: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    outcome = lamc(
        "train", MODEL, "-t", str(topology), "--method", "full", "--data", str(data),
        "-o", str(out), "--steps", "3", "--micro-batches", "4", "--dims", "batch=2",
        "--optimizer", "sgd", "--json", *extra,
    )  # fmt: skip
    return outcome.code, outcome.stdout, outcome.final


def test_a_run_writes_its_result_and_one_json_line_per_step(setup: tuple[Path, Path]) -> None:
    topology, data = setup
    out = data.parent / "run"
    code, stdout, final = _train(topology, data, out)
    assert code == 0, stdout + final
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert all(x["loss"] > 0 and x["step_ms"] > 0 for x in lines)
    run = json.loads((out / "run.json").read_text())
    assert run["result"] == "model.safetensors" and (out / "model.safetensors").is_file()
    assert [s["loss"] for s in run["steps"]] == [x["loss"] for x in lines]
    assert run["predicted_step_ms"] > 0 and run["measured_step_ms"] > 0
    assert not list(out.glob("stage-*.safetensors"))  # gathered into one file
    assert "PASSED train" in final


def test_bad_data_and_prompt_runs_are_refused_and_nothing_is_written(
    setup: tuple[Path, Path],
) -> None:
    topology, data = setup
    out = data.parent / "run"
    bad = data.parent / "bad.npz"
    np.savez(bad, tokens=np.zeros((4, 8), dtype=np.int64))
    code, _, final = _train(topology, bad, out)
    assert code == 2 and "no input_ids array" in final, final
    floats = data.parent / "floats.npz"
    np.savez(floats, input_ids=np.zeros((4, 8), dtype=np.float32))
    code, _, final = _train(topology, floats, out)
    assert code == 2 and "must be integers" in final, final
    outcome = lamc("train", MODEL, "-t", str(topology), "--method", "prompt",
                   "--data", str(data), "-o", str(out))  # fmt: skip
    assert outcome.code == 2 and "prompt tuning is not built yet" in outcome.final
    outcome = lamc("train", MODEL, "-t", str(topology))
    assert outcome.code == 2 and "needs --data" in outcome.final
    assert not out.exists()


def test_a_stage_that_dies_fails_the_run_naming_it(setup: tuple[Path, Path]) -> None:
    topology, data = setup
    out = data.parent / "run"
    # Token ids past the vocabulary: the first stage's embedding fails, the second would
    # wait for it for ever.
    wild = data.parent / "wild.npz"
    np.savez(wild, input_ids=np.full((8, 16), 10_000, dtype=np.int64))
    code, stdout, final = _train(topology, wild, out)
    assert code == 10, stdout + final
    assert "stage 0 on cpu0 exited" in final, final
    assert not out.exists() and not list(out.parent.glob(".run.lamc-*"))

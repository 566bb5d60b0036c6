"""`lamc train --data D.npz -o RUN`: a run on stage processes here, written atomically;
bad data, a soft prompt longer than the model's context, and a stage that dies each say
why."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
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


def _train(
    topology: Path, data: Path, out: Path, *extra: str, method: str = "full"
) -> tuple[int, str, str]:
    outcome = lamc(
        "train", MODEL, "-t", str(topology), "--method", method, "--data", str(data),
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
    # each stage process's peak memory, beside what the plan predicted for its stage
    assert [m["device"] for m in run["memory"]] == ["cpu0", "cpu1"]
    assert all(m["peak_rss_bytes"] > 2**20 and m["predicted_bytes"] > 0 for m in run["memory"])
    assert not list(out.glob("stage-*.safetensors"))  # gathered into one file
    assert "PASSED train" in final


def test_a_data_parallel_run(setup: tuple[Path, Path]) -> None:
    """`--data-parallel`: a replica of the whole model on each device, micro-batches shared
    by speed; the result and its record as a pipeline's, the replicas' memory beside the
    plan's; a device that cannot hold a replica refuses it (exit 6)."""
    topology, data = setup
    out = data.parent / "dp"
    code, stdout, final = _train(topology, data, out, "--data-parallel")
    assert code == 0, stdout + final
    run = json.loads((out / "run.json").read_text())
    assert run["job"]["replicas"] == [2, 2] and run["job"]["split_points"] == []
    assert run["plan"]["choice"] == "data parallel"
    assert [m["device"] for m in run["memory"]] == ["cpu0", "cpu1"]
    assert all(m["peak_rss_bytes"] > 2**20 for m in run["memory"])
    assert (out / "model.safetensors").is_file() and "2 replica process(es)" in final
    small = topology.parent / "small.yaml"
    small.write_text(TWO.replace("memory: 4GiB", "memory: 300MiB", 1))
    code, stdout, final = _train(small, data, data.parent / "dp2", "--data-parallel")
    assert code == 6 and "no data-parallel run" in final and "cpu0" in final, final


def _train_with_joiner(
    topology: Path, data: Path, out: Path, hosts: Path
) -> tuple[int, str, str, tuple[int, str]]:
    """A run launched with `--hosts`, its second host joining from a process of its own
    (`lamc train --join hosts.yaml --stage 1`): the run's outcome, and the joiner's exit
    code and output."""
    joined = subprocess.Popen(
        [sys.executable, "-m", "lamc", "train", "--join", str(hosts), "--stage", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        code, stdout, final = _train(topology, data, out, "--hosts", str(hosts))
        joined_out, _ = joined.communicate(timeout=180)
    finally:
        joined.kill()
    return code, stdout, final, (joined.returncode, joined_out)


def test_a_run_across_hosts(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """`--hosts`: stage 0 runs where the run is launched, stage 1 joins from "its host"
    (`lamc train --join hosts.yaml --stage 1`, a process of its own here, on another
    port); the job and the data reach it from stage 0, its weights come back, and the
    run equals one launched on this machine."""
    from tests.runtime.servers import free_port

    topology, data = setup
    hosts = tmp_path / "hosts.yaml"
    port = free_port()
    hosts.write_text(f"stages:\n  - 127.0.0.1:{port}\n  - 127.0.0.1:{free_port()}\n")
    code, stdout, final, (joined_code, joined_out) = _train_with_joiner(
        topology, data, tmp_path / "far", hosts
    )
    assert code == 0, stdout + final
    assert joined_code == 0 and "handed to stage 0" in joined_out, joined_out
    far = json.loads((tmp_path / "far" / "run.json").read_text())
    assert [m["device"] for m in far["memory"]] == ["cpu0", "cpu1"]
    assert all(m["peak_rss_bytes"] for m in far["memory"])  # stage 1's report came back
    code, stdout, final = _train(topology, data, tmp_path / "near")
    assert code == 0, stdout + final
    near = json.loads((tmp_path / "near" / "run.json").read_text())
    assert [s["loss"] for s in far["steps"]] == pytest.approx(
        [s["loss"] for s in near["steps"]], rel=1e-6
    )
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "far" / "model.safetensors"))
    b = load_file(str(tmp_path / "near" / "model.safetensors"))
    assert set(a) == set(b) and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    # A hosts file that does not list one host a stage, or asks for TLS, is refused.
    hosts.write_text(f"stages:\n  - 127.0.0.1:{port}\n")
    code, _, final = _train(topology, data, tmp_path / "bad", "--hosts", str(hosts))
    assert code == 2 and "lists 1 host(s); the run has 2" in final, final


def test_a_prompt_tuning_run_writes_a_peft_adapter(setup: tuple[Path, Path]) -> None:
    topology, data = setup
    out = data.parent / "run"
    code, stdout, final = _train(
        topology, data, out, "--prompt-tokens", "3", "--lr", "0.05", method="prompt"
    )
    assert code == 0, stdout + final
    run = json.loads((out / "run.json").read_text())
    assert run["result"] == "adapter" and run["job"]["prompt_tokens"] == 3
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"]) == ("PROMPT_TUNING", 3)


def test_bad_data_and_a_prompt_past_the_context_are_refused_and_nothing_is_written(
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
                   "--prompt-tokens", "250", "--dims", "seq=16", "--data", str(data),
                   "-o", str(out))  # fmt: skip
    assert outcome.code == 2 and "make 266 positions; the model takes at most 256" in outcome.final
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


def _stage_pid(run: Path, rank: int) -> int | None:
    """The pid of the `lamc.training.worker` process of stage `rank` of the run in `run`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = b"lamc.training.worker" in cmdline and str(run).encode() in cmdline
        if ours and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def _kill_at(command: list[str], run: Path, step: int, every: int = 3) -> int:
    """Run `command` (a lamc train with --json and --checkpoint-every), SIGKILL its stage 0
    once step `step` is reported; the step its newest checkpoint holds."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        if line.startswith("{"):
            seen.append(json.loads(line)["step"])
            if seen[-1] == step:
                pid = _stage_pid(run, 0)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 10, stderr
    assert "stage 0 on cpu0 exited with -9" in stderr, stderr
    assert "lamc train --resume" in stderr, stderr
    assert not (run / "run.json").exists() and (run / "job.json").is_file()
    saved = json.loads(next((run / "checkpoints").glob("step-*/complete.json")).read_text())
    # At most --checkpoint-every steps are lost.
    assert max(seen) + 1 - saved["step"] <= every, (seen, saved)
    return int(saved["step"])


def test_a_stage_killed_mid_run_resumes_from_its_checkpoint_with_the_same_losses(
    setup: tuple[Path, Path],
) -> None:
    topology, data = setup
    steps, every = 12, 3
    whole = data.parent / "whole"
    code, _, final = _train(
        topology, data, whole, "--steps", str(steps), "--checkpoint-every", str(every)
    )
    assert code == 0, final
    expected = [s["loss"] for s in json.loads((whole / "run.json").read_text())["steps"]]
    assert len(expected) == steps and not (whole / "checkpoints").exists()

    run = data.parent / "killed"
    command = [
        sys.executable, "-m", "lamc", "train", MODEL, "-t", str(topology), "--method", "full",
        "--data", str(data), "-o", str(run), "--steps", str(steps), "--micro-batches", "4",
        "--dims", "batch=2", "--optimizer", "sgd", "--json", "--checkpoint-every", str(every),
    ]  # fmt: skip
    # Killed at step 4, resumed, killed again at step 8, then resumed on a plan made anew
    # without cpu1 (one stage on cpu0).
    first = _kill_at(command, run, 4)
    second = _kill_at(
        [sys.executable, "-m", "lamc", "train", "--resume", str(run), "--json"], run, 8
    )
    assert first < second
    outcome = lamc("train", "--resume", str(run), "--without", "cpu1", "--json")
    assert outcome.code == 0, outcome.stdout + outcome.final
    resumed = [json.loads(x)["step"] for x in outcome.stdout.splitlines() if x.startswith("{")]
    assert resumed == list(range(second, steps))
    assert json.loads((run / "job.json").read_text())["devices"] == ["cpu0"]
    record = json.loads((run / "run.json").read_text())
    assert [s["step"] for s in record["steps"]] == list(range(steps))
    np.testing.assert_allclose([s["loss"] for s in record["steps"]], expected, rtol=1e-5)
    assert (run / "model.safetensors").is_file() and not (run / "checkpoints").exists()
    again = lamc("train", "--resume", str(run))
    assert again.code == 2 and "the run has finished" in again.final


def test_checkpoints_across_hosts_are_kept_where_the_run_was_launched(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """`--hosts` with `--checkpoint-every`: every stage's part of each checkpoint reaches
    stage 0's run directory. The host of stage 1 dies mid-run; `lamc train --resume RUN
    --hosts` continues there with a new stage 1 joining, which receives the checkpoint,
    and the losses equal an uninterrupted run's."""
    from tests.runtime.servers import free_port

    topology, data = setup
    steps, every = 6, 2
    code, _, final = _train(topology, data, tmp_path / "near", "--steps", str(steps))
    assert code == 0, final
    expected = [
        s["loss"] for s in json.loads((tmp_path / "near" / "run.json").read_text())["steps"]
    ]

    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(f"stages:\n  - 127.0.0.1:{free_port()}\n  - 127.0.0.1:{free_port()}\n")
    env = {**os.environ, "LAMC_TRAIN_TIMEOUT_S": "60"}
    join = [sys.executable, "-m", "lamc", "train", "--join", str(hosts), "--stage", "1"]
    joined = subprocess.Popen(
        join, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    run = tmp_path / "far"
    command = [
        sys.executable, "-m", "lamc", "train", MODEL, "-t", str(topology), "--method", "full",
        "--data", str(data), "-o", str(run), "--steps", str(steps), "--micro-batches", "4",
        "--dims", "batch=2", "--optimizer", "sgd", "--json", "--checkpoint-every", str(every),
        "--hosts", str(hosts),
    ]  # fmt: skip
    launched = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert launched.stdout is not None
    try:
        for line in launched.stdout:
            if line.startswith("{") and json.loads(line)["step"] == 2:
                os.killpg(joined.pid, signal.SIGKILL)  # stage 1's host is gone
                break
        _, stderr = launched.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(joined.pid, signal.SIGKILL)
        launched.kill()
    assert launched.returncode == 10, stderr
    assert "lamc train --resume" in stderr, stderr
    saved = sorted((run / "checkpoints").glob("step-*/complete.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["step"] == 2
    assert sorted(p.name for p in saved[0].parent.glob("stage-*")) == [
        "stage-0.safetensors",
        "stage-1.safetensors",
    ]

    rejoined = subprocess.Popen(
        join, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        outcome = lamc("train", "--resume", str(run), "--hosts", str(hosts), "--json")
        rejoined_out, _ = rejoined.communicate(timeout=120)
    finally:
        rejoined.kill()
    assert outcome.code == 0, outcome.stdout + outcome.final
    assert rejoined.returncode == 0, rejoined_out
    record = json.loads((run / "run.json").read_text())
    assert [s["step"] for s in record["steps"]] == list(range(steps))
    np.testing.assert_allclose([s["loss"] for s in record["steps"]], expected, rtol=1e-5)


FAR = """lamc_topology: 1
name: two-fast-one-far
devices:
  - {name: a, host: a, kind: cpu, memory: 4GiB, peak: {fp32: 100GFLOPS}, memory_bandwidth: 20GB/s}
  - {name: b, host: b, kind: cpu, memory: 4GiB, peak: {fp32: 100GFLOPS}, memory_bandwidth: 20GB/s}
  - {name: c, host: c, kind: cpu, memory: 4GiB, peak: {fp32: 5GFLOPS}, memory_bandwidth: 5GB/s}
links:
  - {a: a, b: b, bandwidth: 10Gbit/s, latency: 0.05ms}
  - {a: a, b: c, bandwidth: 10Mbit/s, latency: 2ms}
  - {a: b, b: c, bandwidth: 10Mbit/s, latency: 2ms}
"""


def test_a_run_with_a_replicated_stage(setup: tuple[Path, Path]) -> None:
    """Two fast devices and a slow one behind a slow link: the plan replicates the model
    on the two fast ones (every micro-batch shared, gradients all-reduced over their fast
    link), which beats every chain and data parallelism over all three; the run takes it,
    and its losses equal the chain's run (`--replicate off`)."""
    _, data = setup
    topology = data.parent / "far.yaml"
    topology.write_text(FAR)
    code, stdout, final = _train(topology, data, data.parent / "groups")
    assert code == 0, stdout + final
    assert "(replicated)" in final, final
    run = json.loads((data.parent / "groups" / "run.json").read_text())
    assert run["job"]["stage_groups"] == [[2, 2]]
    assert [m["device"] for m in run["memory"]] == ["a", "b"]
    assert all(m["peak_rss_bytes"] for m in run["memory"])
    code, stdout, final = _train(topology, data, data.parent / "chain", "--replicate", "off")
    assert code == 0, stdout + final
    chain = json.loads((data.parent / "chain" / "run.json").read_text())
    assert not chain["job"]["stage_groups"]
    assert [s["loss"] for s in run["steps"]] == pytest.approx(
        [s["loss"] for s in chain["steps"]], rel=1e-5
    )
    # Across hosts: each member of the replicated stage is a host of the hosts file, in
    # the plan's order; the second joins from "its host" and the run equals the local one.
    from tests.runtime.servers import free_port

    hosts = data.parent / "hosts.yaml"
    hosts.write_text(f"stages:\n  - 127.0.0.1:{free_port()}\n  - 127.0.0.1:{free_port()}\n")
    code, stdout, final, (joined_code, joined_out) = _train_with_joiner(
        topology, data, data.parent / "far", hosts
    )
    assert code == 0, stdout + final
    assert "(replicated)" in final, final
    assert joined_code == 0, joined_out
    far = json.loads((data.parent / "far" / "run.json").read_text())
    assert far["job"]["stage_groups"] == [[2, 2]]
    assert all(m["peak_rss_bytes"] for m in far["memory"])  # the joiner's report came back
    assert [s["loss"] for s in far["steps"]] == pytest.approx(
        [s["loss"] for s in run["steps"]], rel=1e-6
    )

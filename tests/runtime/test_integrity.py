"""Nothing loads before the manifest verifies: hashes, sizes, paths, schema."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.errors import ExitCode, IntegrityError
from lamc.runtime import executor
from lamc.runtime.executor import Pipeline
from lamc.verify import verify
from tests.compiled import compile_zoo


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "out"
    compile_zoo("zoo:gpt2:test", out, 2, failover=1)  # the fuzz mutates failover plans too
    return out


@pytest.fixture
def copy(compiled: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(compiled, target)
    return target


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to create a session fails the test: verification must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stage was loaded before the manifest verified")

    monkeypatch.setattr(executor, "load_stage", refuse)


def _fails(out: Path, needle: str) -> str:
    with pytest.raises(IntegrityError) as info:
        Pipeline.open(out)
    assert info.value.exit_code == ExitCode.INTEGRITY
    assert needle in info.value.message, info.value.message
    return info.value.message


def test_intact_output_verifies(compiled: Path) -> None:
    manifest = verify(compiled)
    assert [s.index for s in manifest.stages] == [0, 1]


def _weights_file(out: Path, stage: int) -> str:
    """A shared weight file stage `stage` loads."""
    data = json.loads((out / "manifest.json").read_text())
    return str(data["stages"][stage]["weights"][0]["file"])


@pytest.mark.parametrize("target", ["model", "weights"])
def test_flipped_byte(copy: Path, target: str, no_loading: None) -> None:
    relative = "stage-1/model.onnx" if target == "model" else _weights_file(copy, 1)
    path = copy / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _fails(copy, f"{relative}: sha256")


def test_truncated_file(copy: Path, no_loading: None) -> None:
    relative = _weights_file(copy, 0)
    path = copy / relative
    path.write_bytes(path.read_bytes()[:-100])
    _fails(copy, f"{relative}: size")


def test_missing_file(copy: Path, no_loading: None) -> None:
    (copy / "stage-0" / "model.onnx").unlink()
    _fails(copy, "stage-0/model.onnx: missing")


def _edit(out: Path, change: object) -> None:
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))


def test_edited_hash(copy: Path, no_loading: None) -> None:
    _edit(copy, lambda d: d["stages"][0]["files"][0].update(sha256="0" * 64))
    _fails(copy, "stage-0/model.onnx: sha256")


def test_edited_manifest_breaks_schema(copy: Path, no_loading: None) -> None:
    _edit(copy, lambda d: d["stages"][0].update(backend="pytorch"))
    _fails(copy, "stages/0/backend")
    _edit(copy, lambda d: d.update(lamc_manifest=3))
    _fails(copy, "lamc_manifest is 3")


def test_not_json(copy: Path, no_loading: None) -> None:
    (copy / "manifest.json").write_text("{ not json")
    _fails(copy, "not valid JSON")


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "stage-0/../../x"])
def test_paths_that_leave_the_directory(copy: Path, path: str, no_loading: None) -> None:
    _edit(copy, lambda d: d["stages"][0]["files"][0].update(path=path))
    with pytest.raises(IntegrityError):
        Pipeline.open(copy)


def test_symlinked_artifact(copy: Path, tmp_path: Path, no_loading: None) -> None:
    real = copy / "stage-1" / "model.onnx"
    elsewhere = tmp_path / "elsewhere.onnx"
    shutil.move(real, elsewhere)
    os.symlink(elsewhere, real)
    _fails(copy, "is a symlink")


def test_wrong_inputs_say_expected_and_got(compiled: Path) -> None:
    pipeline = Pipeline.open(compiled)
    good = np.zeros((1, 5), np.int64)
    cases = [
        ({"input_ids": good.astype(np.int32)}, "expected dtype int64, got int32"),
        ({"input_ids": np.zeros((5,), np.int64)}, "expected rank 2"),
        ({"input_ids": np.zeros((1, 300), np.int64)}, "expected seq in 1..256"),
        ({"ids": good}, "unknown tensor(s) ids"),
        ({}, "missing tensor(s) input_ids"),
    ]
    from lamc.runtime.tensors import TensorMismatch

    for feeds, needle in cases:
        with pytest.raises(TensorMismatch) as info:
            pipeline.run(feeds)
        assert info.value.exit_code == ExitCode.USAGE
        assert needle in info.value.message, info.value.message


def test_missing_provider_is_an_error_unless_overridden(copy: Path) -> None:
    from lamc.errors import RuntimeEnvironmentError

    _edit(
        copy,
        lambda d: [
            s.update(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            for s in d["stages"]
        ],
    )
    with pytest.raises(RuntimeEnvironmentError) as info:
        Pipeline.open(copy)
    assert (
        info.value.exit_code == ExitCode.ENVIRONMENT
        and "CUDAExecutionProvider" in info.value.message
    )
    pipeline = Pipeline.open(copy, providers=("CPUExecutionProvider",))
    assert pipeline.run({"input_ids": np.zeros((1, 4), np.int64)})["logits"].shape == (1, 4, 512)


def test_a_scalar_tensor_stays_a_scalar() -> None:
    """0-d tensors (a sequence length handed between stages) keep rank 0 through checks."""
    import numpy as np

    from lamc.manifest import TensorSpec
    from lamc.runtime.tensors import TensorMismatch, check

    spec = TensorSpec("length", "int64", ())
    out = check(spec, np.array(8, dtype=np.int64), {}, {}, "stage 1")
    assert out.shape == () and int(out) == 8
    with pytest.raises(TensorMismatch, match="expected rank 0"):
        check(spec, np.array([8], dtype=np.int64), {}, {}, "stage 1")


def test_a_file_taken_off_the_list_is_not_read_unchecked(copy: Path, no_loading: None) -> None:
    # Drop a weight file from every stage's file list, then tamper with it.
    relative = _weights_file(copy, 0)

    def drop(d: dict[str, Any]) -> None:
        for stage in d["stages"]:
            stage["files"] = [f for f in stage["files"] if f["path"] != relative]

    _edit(copy, drop)
    path = copy / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _fails(copy, f"{relative} is not one of the stage's files")


def test_a_weight_outside_its_file_or_of_the_wrong_size_is_refused(
    copy: Path, no_loading: None
) -> None:
    def past_the_end(d: dict[str, Any]) -> None:
        ref = d["stages"][0]["weights"][0]
        ref["offset"] = 10**9

    _edit(copy, past_the_end)
    _fails(copy, "lie past the end")

    def wrong_shape(d: dict[str, Any]) -> None:
        d["stages"][0]["weights"][0]["shape"] = [1, 2, 3]

    _edit(copy, wrong_shape)
    _fails(copy, "bytes for")


def test_a_shared_file_listed_differently_by_two_stages_is_refused(
    copy: Path, no_loading: None
) -> None:
    def differ(d: dict[str, Any]) -> None:
        # The same path with another hash in a second stage's list.
        first = d["stages"][0]["files"][-1]
        d["stages"][1]["files"].append({**first, "sha256": "0" * 64})

    _edit(copy, differ)
    _fails(copy, "with different sizes or hashes")


def test_required_runtime_version_is_checked(copy: Path, no_loading: None) -> None:
    from lamc.errors import RuntimeEnvironmentError

    _edit(copy, lambda d: d.update(requires={"onnxruntime": ">=99.0"}))
    with pytest.raises(RuntimeEnvironmentError) as info:
        Pipeline.open(copy)
    assert info.value.exit_code == ExitCode.ENVIRONMENT
    assert "requires onnxruntime >=99.0" in info.value.message
    _edit(copy, lambda d: d.update(requires={"lamc-no-such-package": ">=1.0"}))
    with pytest.raises(RuntimeEnvironmentError) as info:
        Pipeline.open(copy)
    assert "lamc-no-such-package >=1.0, which is not installed" in info.value.message


def test_inconsistent_dims_fail_before_loading(copy: Path, no_loading: None) -> None:
    def widen(d: dict[str, Any]) -> None:
        name = next(iter(d["dims"]))
        d["dims"][name] = {"min": 9, "max": 2}

    _edit(copy, widen)
    _fails(copy, "min 9 > max 2")


def test_swapped_stages_fail_before_loading(copy: Path, no_loading: None) -> None:
    def swap(d: dict[str, Any]) -> None:
        first, second = d["stages"]
        first["index"], second["index"] = 1, 0
        d["stages"] = [second, first]

    _edit(copy, swap)
    _fails(copy, "does not send")


def test_token_ids_outside_the_vocabulary_are_refused_at_the_first_hop(compiled: Path) -> None:
    from lamc.runtime.tensors import TensorMismatch

    pipeline = Pipeline.open(compiled)
    spec = pipeline.manifest.tensors["input_ids"]
    assert spec.range is not None and spec.range[0] == 0
    vocabulary = spec.range[1]
    for bad in (-1, vocabulary):
        ids = np.array([[1, 2, bad]], dtype=np.int64)
        with pytest.raises(TensorMismatch) as info:
            pipeline.run({"input_ids": ids})
        assert f"expected values in 0..{vocabulary - 1}, got {bad}" in str(info.value)


# ------------------------------------------------------------------- manifest fuzzing

_HOSTILE = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            -1,
            0,
            "9" * 5000,
            "a\x00b",
            "../../etc/passwd",
            "/etc/passwd",
            "seq//0",
            "s" * 5000,
            [],
            {},
            1e308,
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=40),
)


def _leaves(node: Any, trail: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [t for k, v in sorted(node.items()) for t in _leaves(v, (*trail, k))]
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in _leaves(v, (*trail, i))]
    return [trail]


def _set(node: Any, trail: tuple[Any, ...], value: Any) -> None:
    for key in trail[:-1]:
        node = node[key]
    node[trail[-1]] = value


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_manifests_fail_with_a_reason_never_a_traceback(
    compiled: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    import shutil

    from lamc.errors import LamcError

    out = tmp_path_factory.mktemp("fuzz") / "out"
    shutil.copytree(compiled, out)
    original = json.loads((out / "manifest.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    leaves = _leaves(manifest)
    trail = data.draw(st.sampled_from(leaves), label="field")
    value = data.draw(_HOSTILE, label="value")
    _set(manifest, trail, value)
    (out / "manifest.json").write_text(json.dumps(manifest))
    try:
        verify(out)
    except LamcError as exc:
        assert exc.exit_code in (ExitCode.INTEGRITY, ExitCode.USAGE, ExitCode.ENVIRONMENT)
        assert exc.message and "\n" not in exc.message[:200]
        return
    # It verified: then what a session reads (every file's path, size and hash) is intact.
    if trail and trail[0] == "stages" and "files" in trail:
        assert manifest["stages"][trail[1]]["files"] == original["stages"][trail[1]]["files"]


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"lamc_manifest": 1, "size": ' + "9" * 5000 + "}",
    ],
)
def test_hostile_json_is_an_integrity_error(copy: Path, text: str) -> None:
    (copy / "manifest.json").write_text(text)
    with pytest.raises(IntegrityError, match="not valid JSON"):
        verify(copy)


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (None, "entries for"),  # one entry short
        ("nosuchdim", "cannot be evaluated"),
        ("1//(seq-seq)", "cannot be evaluated"),
        ("seq*1000000000*1000000000*1000", "evaluates to"),
    ],
)
def test_recorded_shape_values_are_checked_before_loading(
    copy: Path, entry: str | None, needle: str, no_loading: None
) -> None:
    data = json.loads((copy / "manifest.json").read_text())
    name = next(n for n, t in sorted(data["tensors"].items()) if "value" in t)
    recorded = data["tensors"][name]["value"]
    value = recorded[1:] if entry is None else [entry, *recorded[1:]]
    _edit(copy, lambda d: d["tensors"][name].update(value=value))
    message = _fails(copy, f"tensors/{name}/value")
    assert needle in message, message


def test_a_stage_server_hashes_its_weights_before_it_serves(copy: Path) -> None:
    """A stage server hashes its weight files while its session is built; a tampered one
    stops it before health says SERVING, with the file named (exit 9)."""
    import asyncio

    from lamc.runtime.server import StageService
    from tests.runtime.servers import free_port

    relative = _weights_file(copy, 1)
    path = copy / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    service = StageService(copy, 1, listen=f"127.0.0.1:{free_port()}")
    with pytest.raises(IntegrityError) as info:
        asyncio.run(service.start())
    assert info.value.exit_code == ExitCode.INTEGRITY
    assert f"{relative}: sha256" in info.value.message, info.value.message
    assert service.queue is not None and service.queue.empty()
    assert not service.counts["accepted"]


def test_a_stage_load_begun_early_is_handed_over_for_the_same_arguments_only(
    compiled: Path, tmp_path: Path
) -> None:
    """`lamc serve` begins checking and loading its stage before the command line is
    parsed; the command takes that load only for the very arguments it parsed, and any
    argument the guess does not understand leaves nothing begun (the command reports)."""
    from lamc.runtime import loading

    loading.begin_early([str(compiled), "--listen", "127.0.0.1:1", "--stage", "1", "--insecure"])
    assert loading._early is not None
    begun = loading._early[1]
    taken = loading.take(compiled, 1, without=(), providers=None, threads=None)
    assert taken is begun and loading._early is None
    runner, _ = taken.session.result(timeout=120)
    assert runner.spec.index == 1 and taken.hashed.result(timeout=120) >= 0
    # Other arguments than the command parsed: a load of its own.
    loading.begin_early([str(compiled), "--stage=0", "--threads", "1"])
    assert loading._early is not None
    other = loading.take(compiled, 0, without=(), providers=None, threads=None)
    assert other is not loading._early and other.spec.index == 0
    assert loading._early is None
    # Nothing begun for what the guess cannot read, or where the command would fail.
    for args in (
        [str(compiled), "--stage", "x"],
        [str(compiled), "--stage", "9"],
        [str(tmp_path / "missing"), "--stage", "0"],
        [str(compiled), "--stage", "1", "--help"],
        [str(compiled), "--ray", "auto"],
        [str(compiled), "-x", "--stage", "1"],
        ["--stage"],
    ):
        loading.begin_early(args)
        assert loading._early is None, args


def test_a_head_start_is_taken_only_for_the_stage_the_full_check_names(copy: Path) -> None:
    """`lamc serve` begins building its session before lamc is imported
    (`lamc.runtime.early`), from the manifest read with `json` alone; the server takes that
    session only once the whole artifact checked and names the same graph, weights and
    options, and builds afresh otherwise."""
    from lamc.runtime import early, loading

    args = [str(copy), "--stage", "1", "--listen", "127.0.0.1:1"]
    early.begin(args)
    head = early._begun
    assert head is not None and head.under_way.is_set()
    loading.begin_early(args)
    assert loading._early is not None and early._begun is None
    load = loading._early[1]
    loading._early = None
    runner, _ = load.session.result(timeout=120)
    assert load.head is head and load.head_start and runner.runner is head.result()[0]
    assert runner.spec == executor.Pipeline.open(copy).stages[1].spec

    # The manifest changed between the head start and the check (other session options):
    # the check's stage is built, not the head start's.
    early.begin(args)
    head = early._begun
    assert head is not None
    _edit(copy, lambda d: d["stages"][1]["session"].update(threads=1))
    rebuilt = loading.StageLoad(copy, 1)
    runner, _ = rebuilt.session.result(timeout=120)
    assert rebuilt.head is None and not rebuilt.head_start
    assert runner.runner is not head.result()[0]
    # Arguments other than those it began for: dropped.
    early.begin([*args, "--threads", "2"])
    assert early._begun is not None
    assert loading.StageLoad(copy, 1).head is None and early._begun is None


def test_a_head_start_begins_nothing_for_a_graph_that_does_not_match(copy: Path) -> None:
    """The head start hashes every file the session parses before ONNX Runtime opens it: a
    modified stage graph, a path out of the artifact or a failover plan's stage begin
    nothing, and the server's own check names the file (exit 9)."""
    from lamc.runtime import early
    from lamc.runtime.loading import StageLoad

    data = json.loads((copy / "manifest.json").read_text())
    graph = copy / data["stages"][1]["model"]
    original = graph.read_bytes()
    graph.write_bytes(original[:-1] + bytes([original[-1] ^ 0x01]))
    early.begin([str(copy), "--stage", "1"])
    assert early._begun is None
    with pytest.raises(IntegrityError) as info:
        StageLoad(copy, 1)
    assert info.value.exit_code == ExitCode.INTEGRITY
    assert f"{data['stages'][1]['model']}: sha256" in info.value.message
    graph.write_bytes(original)
    lost = data["stages"][0]["device"]
    early.begin([str(copy), "--stage", "0", "--without", lost])
    assert early._begun is None
    _edit(copy, lambda d: d["stages"][1].update(model="../" + d["stages"][1]["model"]))
    early.begin([str(copy), "--stage", "1"])
    assert early._begun is None


def test_a_switch_asked_for_while_the_stage_starts_is_refused(compiled: Path) -> None:
    """A stage server listens before its session is built and checked; a reconfigure or
    variant switch before then is answered UNAVAILABLE (after the token check)."""
    import asyncio
    from types import SimpleNamespace

    from lamc.runtime import wire
    from lamc.runtime.reconfigure import reconfigure, switch_variant
    from lamc.runtime.server import StageService
    from tests.runtime.servers import free_port

    service = StageService(compiled, 1, listen=f"127.0.0.1:{free_port()}", token="t")
    assert not service.ready
    context = SimpleNamespace(invocation_metadata=lambda: (("authorization", "Bearer t"),))
    stranger = SimpleNamespace(invocation_metadata=lambda: ())
    for switch, request in (
        (reconfigure, wire.ReconfigureRequest(stage=0)),
        (switch_variant, wire.VariantRequest(method="fp16")),
    ):
        reply = asyncio.run(switch(service, request, context))
        assert (reply.ok, reply.code) == (False, "UNAVAILABLE"), reply
        assert "still starting" in reply.message
        reply = asyncio.run(switch(service, request, stranger))
        assert reply.code == "UNAUTHENTICATED"
    service._load.session.result(timeout=120)

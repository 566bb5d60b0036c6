"""lamc compile: deterministic, atomic, and honest about what it cannot do."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lamc.atomic import atomic_directory
from lamc.errors import DoesNotFitError, UsageError
from lamc.frontend import CaptureOptions
from tests.compiled import MINIPCS, compile_zoo

ROOT = Path(__file__).parent.parent


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_two_compiles_are_byte_identical(tmp_path: Path) -> None:
    """Two compiles from two fresh captures of the same model and topology."""
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Constraints

    options = CompileOptions(request=PlanRequest(constraints=Constraints(stages=3)))
    compile_model("zoo:llama:test", MINIPCS, tmp_path / "a", options)
    compile_model("zoo:llama:test", MINIPCS, tmp_path / "b", options)
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second
    assert "manifest.json" in first and "stage-2/model.onnx" in first
    assert any(path.startswith("weights/") for path in first)


def test_manifest_is_written_last_and_output_replaced_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    compile_zoo("zoo:resnet:test", out, 2)
    before = _tree(out)
    # A compile that fails after building has begun leaves the previous OUT untouched
    # and no temporary directory behind.
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "stage-0").mkdir()
        (tmp / "stage-0" / "model.onnx").write_bytes(b"half written")
        raise RuntimeError("the build failed")
    assert _tree(out) == before
    assert not list(tmp_path.glob(".out.lamc-*"))
    # A successful compile of another model replaces it whole.
    compile_zoo("zoo:vit:test", out, 2)
    assert _tree(out) != before and (out / "manifest.json").is_file()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"...")
    with pytest.raises(UsageError, match="refusing to replace it"):
        compile_zoo("zoo:resnet:test", tmp_path / "photos", 1)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"..."


def test_budget_failure_writes_nothing(tmp_path: Path) -> None:
    from lamc.compiler import CompileOptions, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Budgets
    from tests.conftest import analysed_model

    with pytest.raises(DoesNotFitError):
        compile_model(
            "zoo:resnet:test",
            MINIPCS,
            tmp_path / "out",
            CompileOptions(request=PlanRequest(budgets=Budgets(max_latency_ms=1e-6))),
            analysed=analysed_model("zoo:resnet:test"),
        )
    assert not (tmp_path / "out").exists()


def test_shapes_only_capture_cannot_compile(tmp_path: Path) -> None:
    from lamc.compiler import CompileOptions, compile_model

    with pytest.raises(UsageError, match="shapes-only"):
        compile_model(
            "zoo:gpt2:test",
            MINIPCS,
            tmp_path / "out",
            CompileOptions(capture=CaptureOptions(weights=False)),
        )


def _lamc(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, CI="true")
    return subprocess.Popen(
        [sys.executable, "-m", "lamc", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_build(
    parent: Path, name: str, process: subprocess.Popen[bytes], timeout: float = 240.0
) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(parent.glob(f".{name}.lamc-*"))
        if found and any(found[0].iterdir()):
            return found[0]
        if process.poll() is not None:
            raise AssertionError(
                f"compile ended before its build step: {process.stderr.read().decode()[-2000:] if process.stderr else ''}"
            )
        time.sleep(0.002)
    raise AssertionError("the build never started")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_build_leaves_out_untouched(tmp_path: Path, how: signal.Signals) -> None:
    out = tmp_path / "out"
    compile_zoo("zoo:resnet:test", out, 2)
    before = _tree(out)
    # Compile a different model into the same OUT and kill it while it writes its stages.
    # gpt2-small's widths with 4 of its layers: a build of about 250 MB, long enough to
    # be killed in, with a shorter capture before it.
    process = _lamc(
        "compile", "zoo:gpt2:small,layers=4", "-t", str(MINIPCS), "-o", "out", "--stages", "3",
        cwd=tmp_path,
    )  # fmt: skip
    _wait_for_build(tmp_path, "out", process)
    process.send_signal(how)
    code = process.wait(timeout=120)
    assert _tree(out) == before  # the previous compile, byte for byte
    leftovers = list(tmp_path.glob(".out.lamc-*"))
    if how == signal.SIGTERM:
        assert code == 130
        assert leftovers == []  # cleaned up on the way out
    else:
        assert code == -signal.SIGKILL
        assert leftovers  # a SIGKILL leaves its temporary directory; the next compile removes it
        compile_zoo("zoo:resnet:test", out, 1)
        assert not list(tmp_path.glob(".out.lamc-*"))


def test_runtime_never_imports_torch_onnx_or_networkx(tmp_path: Path) -> None:
    out = tmp_path / "out"
    compile_zoo("zoo:gpt2:test", out, 3)
    code = (
        "import sys, numpy as np\n"
        "from lamc.runtime.executor import Pipeline\n"
        f"p = Pipeline.open({str(out)!r})\n"
        "y = p.run({'input_ids': np.zeros((1, 4), np.int64)})\n"
        "assert y['logits'].shape == (1, 4, 512)\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnx_ir', 'onnxscript', 'networkx') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # The same holds for the command line: `lamc run`.
    cli = (
        "import sys, atexit\n"
        "atexit.register(lambda: print('loaded:', sorted(m for m in ('torch', 'onnx', 'onnx_ir', 'networkx') if m in sys.modules)))\n"
        f"sys.argv = ['lamc', 'run', {str(out)!r}, '--random']\n"
        "from lamc.cli.main import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", cli],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=dict(os.environ, CI="true"),
    )
    assert "PASSED run" in done.stdout, done.stdout + done.stderr
    assert "loaded: []" in done.stdout


def test_a_swap_cut_short_leaves_nothing_the_next_compile_keeps(tmp_path: Path) -> None:
    import os

    from lamc.atomic import MARKER, STALE_AFTER_S, clean_stale

    # What a compile killed between its swap and its clean-up leaves: no marker.
    leftover = tmp_path / ".out.lamc-abc123"
    (leftover / "stage-0").mkdir(parents=True)
    old = time.time() - STALE_AFTER_S - 5
    os.utime(leftover, (old, old))
    # A live compile's directory (its marker names a running process) is kept.
    live = tmp_path / ".out.lamc-live"
    live.mkdir()
    (live / MARKER).write_text(str(os.getppid()))
    assert clean_stale(tmp_path, "out") == [leftover]
    assert live.exists() and not leftover.exists()


def test_an_output_that_cannot_be_written_fails_before_capture(tmp_path: Path) -> None:
    from tests.cli.helpers import lamc

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    started = time.monotonic()
    outcome = lamc("compile", "zoo:gpt2", "-t", str(MINIPCS), "-o", str(blocker / "out"))
    assert outcome.code == 2, outcome.stdout + outcome.stderr
    assert "is not a directory" in outcome.final
    assert time.monotonic() - started < 30  # no capture of gpt2-small first

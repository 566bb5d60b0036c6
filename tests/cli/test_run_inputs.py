"""`lamc run` with bad or odd inputs: a one-line reason and the documented exit code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.cli.helpers import lamc
from tests.compiled import compile_zoo


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "resnet"
    compile_zoo("zoo:resnet:test", out, 1)
    return out


def test_empty_npy_is_a_usage_error(resnet: Path, tmp_path: Path) -> None:
    empty = tmp_path / "x.npy"
    empty.write_bytes(b"")
    outcome = lamc("run", str(resnet), "--input", f"pixel_values={empty}")
    assert outcome.code == 2, outcome.stdout + outcome.stderr
    assert "is not a .npy array" in outcome.final


def test_unknown_random_dim_is_a_usage_error(resnet: Path) -> None:
    outcome = lamc("run", str(resnet), "--random", "bogus=3")
    assert outcome.code == 2, outcome.stdout + outcome.stderr
    assert "no dim bogus" in outcome.final


def test_non_finite_inputs_warn_and_fail_with_check_finite(resnet: Path, tmp_path: Path) -> None:
    from lamc.verify import read_manifest

    manifest = read_manifest(resnet)
    (name,) = manifest.inputs
    spec = manifest.tensors[name]
    binding = {**manifest.plan.get("binding", {})}
    shape = [d if isinstance(d, int) else binding.get(d, 1) for d in spec.shape]
    array = np.zeros(shape, dtype=np.float32)
    array.flat[0] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, array)
    warned = lamc("run", str(resnet), "--input", f"{name}={path}")
    assert warned.code == 0, warned.stdout + warned.stderr
    assert "NaN or infinite" in warned.stderr
    failed = lamc("run", str(resnet), "--input", f"{name}={path}", "--check-finite")
    assert failed.code == 2, failed.stdout + failed.stderr
    assert "NaN or infinite" in failed.final


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prompt-ids", "1,2", "--temperature", "nan"], "--temperature nan"),
        (["--prompt-ids", "1,2", "--temperature", "1e-320"], "--temperature"),
        (["--prompt-ids", "1," + "9" * 30], "is not a token id"),
        (["--prompt-ids", "1,-5"], "is not a token id"),
        (["--prompt", "hi", "--tokenizer", "{tmp}"], "not a tokenizer lamc can load"),
    ],
)
def test_bad_generate_options_are_usage_errors(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    outcome = lamc("generate", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in args])
    assert outcome.code == 2, outcome.stdout + outcome.stderr
    assert needle in outcome.final, outcome.final


@pytest.mark.parametrize("command", ["run", "serve"])
def test_ray_without_ray_installed_is_an_environment_error(
    resnet: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    outcome = lamc(command, str(resnet), "--ray", "127.0.0.1:1")
    assert outcome.code == 10, outcome.stdout + outcome.stderr
    assert "Ray Serve is not installed" in outcome.final and "lamc[ray]" in (
        outcome.stdout + outcome.stderr
    )


def test_npz_in_and_out(resnet: Path, tmp_path: Path) -> None:
    from lamc.runtime.executor import Pipeline
    from lamc.verify import read_manifest

    manifest = read_manifest(resnet)
    (name,) = manifest.inputs
    spec = manifest.tensors[name]
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    value = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)
    np.savez(tmp_path / "in.npz", **{name: value})
    out = lamc(
        "run", str(resnet), "--input", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")
    )
    assert out.code == 0, out.stdout + out.stderr
    with np.load(tmp_path / "out.npz", allow_pickle=False) as written:
        got = {k: written[k] for k in written.files}
    want = Pipeline.open(resnet).run({name: value})
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    # Hostile archives: an object array (pickle), a truncated member, a name given twice.
    np.savez(tmp_path / "objects.npz", **{name: np.array([{"a": 1}], dtype=object)})
    truncated = tmp_path / "truncated.npz"
    import zipfile

    with zipfile.ZipFile(truncated, "w") as archive:
        archive.writestr(f"{name}.npy", (tmp_path / "in.npz").read_bytes()[:60])
    for bad, words in (
        (tmp_path / "objects.npz", "is not an .npz of arrays"),
        (truncated, "is not an .npz of arrays"),
        (tmp_path / "missing.npz", "does not exist"),
    ):
        out = lamc("run", str(resnet), "--input", str(bad))
        assert out.code == 2 and words in out.final, (bad, out.final)
    out = lamc(
        "run",
        str(resnet),
        "--input",
        str(tmp_path / "in.npz"),
        "--input",
        f"{name}={tmp_path / 'in.npz'}",
    )
    assert out.code == 2 and "given twice" in out.final

"""`lamc bundle`: one device's share of a compiled artifact, for every plan it takes part
in, verifying on its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lamc.errors import ExitCode, IntegrityError, UsageError
from lamc.runtime.executor import Pipeline, load_stage
from lamc.runtime.tensors import warm_up_feeds
from lamc.verify import read_manifest, verify
from tests.cli.helpers import lamc
from tests.compiled import compile_zoo


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "out"
    compile_zoo("zoo:gpt2:test", out, 3, failover=1)
    return out


def _busiest(out: Path) -> str:
    """The device with stages in the most plans."""
    manifest = read_manifest(out)
    counts: dict[str, int] = {}
    for _, stages, _ in manifest.pipelines():
        for stage in stages:
            counts[stage.device] = counts.get(stage.device, 0) + 1
    return max(counts, key=lambda d: counts[d])


def test_a_bundle_holds_every_stage_its_device_runs_and_verifies_alone(
    compiled: Path, tmp_path: Path
) -> None:
    device = _busiest(compiled)
    target = tmp_path / "b"
    outcome = lamc("bundle", str(compiled), "--device", device, "-o", str(target))
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    full = read_manifest(compiled)
    manifest = verify(target)  # hashes every file the bundle holds
    assert manifest.bundle == device
    held = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert held == set(full.files(device)) | {"manifest.json"}
    assert manifest.total_bytes() == full.total_bytes()
    assert sum(f.size for f in manifest.present().values()) < full.total_bytes()
    # Each stage the device runs, in every plan, loads from the bundle and computes what
    # the same stage of the whole artifact computes.
    roles = 0
    for _, stages, _ in manifest.pipelines():
        for spec in stages:
            if spec.device != device:
                continue
            plan = full if spec in full.stages else manifest
            _, feeds = warm_up_feeds(plan, spec)
            got = load_stage(target, spec).run(feeds)
            want = load_stage(compiled, spec).run(feeds)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
            roles += 1
    assert roles >= 2  # the primary plan and at least one failover plan


def test_a_bundle_refuses_what_it_does_not_hold(compiled: Path, tmp_path: Path) -> None:
    device = _busiest(compiled)
    target = tmp_path / "b"
    lamc("bundle", str(compiled), "--device", device, "-o", str(target))
    other = next(s for s in read_manifest(compiled).stages if s.device != device)
    with pytest.raises(UsageError, match=f"holds the files of {device} only"):
        verify(target, stage=other.index)
    with pytest.raises(UsageError, match=f"bundle of device {device}"):
        Pipeline.open(target)
    # A file of another device's stage put into the bundle is refused, not read unchecked.
    extra = tmp_path / "extra"
    shutil.copytree(target, extra)
    relative = other.files[0].path
    (extra / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(compiled / relative, extra / relative)
    with pytest.raises(IntegrityError, match="not in the manifest's file list"):
        verify(extra)
    # A changed byte in a bundled weight file is found.
    weights = next(iter(f for f in read_manifest(target).present() if f.startswith("weights/")))
    data = bytearray((target / weights).read_bytes())
    data[len(data) // 3] ^= 0x10
    (target / weights).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"{weights}: sha256"):
        verify(target)


def test_bundle_errors_leave_nothing_behind(compiled: Path, tmp_path: Path) -> None:
    target = tmp_path / "b"
    outcome = lamc("bundle", str(compiled), "--device", "no-such-device", "-o", str(target))
    assert outcome.code == ExitCode.USAGE and "runs no stage in any plan" in outcome.final
    assert not target.exists()
    # A tampered artifact is not bundled (exit 9), and nothing is written.
    copy = tmp_path / "copy"
    shutil.copytree(compiled, copy)
    stage = json.loads((copy / "manifest.json").read_text())["stages"][0]
    path = copy / stage["files"][0]["path"]
    path.write_bytes(path.read_bytes() + b"x")
    outcome = lamc("bundle", str(copy), "--device", stage["device"], "-o", str(target))
    assert outcome.code == ExitCode.INTEGRITY, outcome.final
    assert not target.exists()
    # A bundle is not bundled again.
    device = _busiest(compiled)
    lamc("bundle", str(compiled), "--device", device, "-o", str(target))
    outcome = lamc("bundle", str(target), "--device", device, "-o", str(tmp_path / "again"))
    assert outcome.code == ExitCode.USAGE and "already the bundle" in outcome.final
    assert not (tmp_path / "again").exists()

"""A CPU quota (a container's CPU limit) read from the process's cgroup, v1 and v2, and
the share of the measured speed `lamc profile` scales its rates to."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamc import profile
from lamc.profile.host import cpu_quota


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_cpu_max(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "0::/kubepods/pod1\n")
    _write(tmp_path / "fs" / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    assert cpu_quota(str(proc), str(tmp_path / "fs")) == pytest.approx(1.5)
    _write(tmp_path / "fs" / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert cpu_quota(str(proc), str(tmp_path / "fs")) is None


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n")
    base = tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc"
    _write(base / "cpu.cfs_quota_us", "50000\n")
    _write(base / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(str(proc), str(tmp_path / "fs")) == pytest.approx(0.5)
    _write(base / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert cpu_quota(str(proc), str(tmp_path / "fs")) is None


def test_no_cgroup_information_means_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(str(tmp_path / "missing"), str(tmp_path)) is None
    proc = tmp_path / "cgroup"
    _write(proc, "garbage\n4:cpu:/gone\n")
    assert cpu_quota(str(proc), str(tmp_path)) is None


def test_the_sustained_share_is_the_quota_over_the_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(profile, "cpu_quota", lambda: 0.5)
    assert profile.sustained_share(1) == pytest.approx(0.5)
    assert profile.sustained_share(2) == pytest.approx(0.25)
    monkeypatch.setattr(profile, "cpu_quota", lambda: 4.0)
    assert profile.sustained_share(2) == 1.0
    monkeypatch.setattr(profile, "cpu_quota", lambda: None)
    assert profile.sustained_share(1) == 1.0

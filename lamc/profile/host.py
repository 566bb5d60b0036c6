"""What the host says about itself: its last-level cache and its memory."""

from __future__ import annotations

import os


def cache_bytes() -> float:
    """The last-level cache, from sysfs (0 where unknown)."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(e for e in os.listdir(base) if e.startswith("index"))
    except OSError:
        return 0.0
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return float(max(sizes, default=0))


def memory_bytes() -> float:
    """Memory lamc may plan to use here: 80% of the machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return 0.8 * int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return 0.8 * pages * os.sysconf("SC_PAGE_SIZE") if pages else 8 * 2**30


def cpu_quota(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs this process may use by its cgroup's CPU quota (a container's `--cpus`, a
    pod's CPU limit), or None when unlimited or unknown. cgroup v2 (`cpu.max`) and v1
    (`cpu.cfs_quota_us` / `cpu.cfs_period_us`)."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        names = controllers.split(",")
        try:
            if controllers == "":
                with open(f"{root}{path}/cpu.max") as f:
                    quota_text, period_text = f.read().split()
                if quota_text != "max":
                    return int(quota_text) / int(period_text)
            elif "cpu" in names:
                for mount in (controllers, "cpu", "cpu,cpuacct"):
                    base = f"{root}/{mount}{path}"
                    if os.path.isfile(f"{base}/cpu.cfs_quota_us"):
                        with open(f"{base}/cpu.cfs_quota_us") as f:
                            quota = int(f.read())
                        with open(f"{base}/cpu.cfs_period_us") as f:
                            period = int(f.read())
                        return quota / period if quota > 0 else None
        except (OSError, ValueError):
            continue
    return None


# A training stage process up to its model: the libraries `lamc train` runs on imported
# and a one-process gloo group started; prints its peak resident memory in KiB.
_TRAINING_PROCESS = """
import os, socket
import torch, torch.distributed as dist
from torch.distributed import pipelining
for name in ("transformers", "peft"):
    try:
        __import__(name)
    except ImportError:
        pass
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
dist.destroy_process_group()
from lamc.training.worker import peak_rss  # as a stage process measures itself
print(peak_rss() // 1024)
"""


def training_runtime_bytes(timeout_s: float = 120.0) -> float:
    """The peak memory of a training stage process before its model, measured in a fresh
    process here (0 when torch is not installed: no training runs on this device)."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", _TRAINING_PROCESS],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    lines = done.stdout.split()
    if done.returncode != 0 or not lines or not lines[-1].isdigit():
        return 0.0
    return float(int(lines[-1]) * 1024)

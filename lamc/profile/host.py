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

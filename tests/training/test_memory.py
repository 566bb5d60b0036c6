"""A stage process reports its own peak memory, not the launcher's it was forked from."""

from __future__ import annotations

import subprocess
import sys


def test_a_stage_process_peak_is_its_own_not_its_launchers() -> None:
    ballast = bytearray(600 * 2**20)  # the launcher holds 600 MiB when it starts the stage
    ballast[:: 2**12] = b"x" * len(ballast[:: 2**12])  # touched: resident
    script = "from lamc.training.worker import peak_rss; print(peak_rss())"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    child = int(done.stdout.split()[-1])
    assert 2**20 < child < 300 * 2**20, child / 2**20  # numpy and lamc: well under 300 MiB
    del ballast

"""Round-robin by speed over the devices of a replicated stage (`--replicate`).

Smooth weighted round-robin: each pick adds every member's share to its credit and goes to
the member with the most, which then pays one request. Over any N picks a member takes
within one request of N x its share, and the picks interleave (2/3 and 1/3 go a, b, a, a,
b, a, ...), so no member waits out a burst while another idles.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence


class Spread:
    def __init__(self, shares: Sequence[float]) -> None:
        if not shares or any(not s > 0 for s in shares):
            raise ValueError(f"shares must be positive, got {list(shares)}")
        total = float(sum(shares))
        self.shares = [float(s) / total for s in shares]
        self.credit = [0.0] * len(shares)
        self.counts = [0] * len(shares)
        self._lock = threading.Lock()

    def pick(self) -> int:
        with self._lock:
            for k, share in enumerate(self.shares):
                self.credit[k] += share
            best = max(range(len(self.credit)), key=self.credit.__getitem__)
            self.credit[best] -= 1.0
            self.counts[best] += 1
            return best

"""Emulated links: each stage in its own Linux network namespace, stages joined by veth
pairs shaped with `tc` to a topology link's bandwidth; latency added in user space.

Layout for S stages (namespaces `lamc<id>-s0` ...):

    root ns (client) --veth, unshaped--> s0, s1, ..., sS-1        (10.<a>.<k>.1 <-> .2)
    s0 --veth, tbf--> s1 --veth, tbf--> s2 ...                   (10.<b>.<k>.1 -> .2)

The client reaches every stage over its own unshaped link (it submits to stage 0 and
subscribes to each stage); stage k hands its outputs to stage k+1 over the shaped link.
The kernel here has no `netem`, so a link's latency is added by the sending stage
(`lamc serve --delay-ms`) to every hand-off, which is where the topology puts it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field


class NetnsUnavailable(RuntimeError):
    """This machine does not let us build the namespaces (not root, no `ip`, no `tc`)."""


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(args)}` failed: {result.stderr.strip()}")


def check_available() -> None:
    """Raise NetnsUnavailable with the reason when namespaces or tbf cannot be used here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` is not installed (iproute2)")
    probe = f"lamcprobe{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


@dataclass
class EmulatedLinks:
    """`with EmulatedLinks(3, rate_mbit=20) as net:` then run stage k with
    `net.prefix(k) + [...]`, listening on `net.listen(k, port)`."""

    stages: int
    rate_mbit: float
    burst_bytes: int = 3200  # two full frames: bursts stay small next to a request
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    _created: list[str] = field(default_factory=list)
    _net: int = field(default_factory=lambda: 20 + int(uuid.uuid4().int % 100))

    def ns(self, k: int) -> str:
        return f"lamc{self.tag}s{k}"

    def client_address(self, k: int) -> str:
        """Stage k's address as the client (root namespace) reaches it."""
        return f"10.{self._net}.{k}.2"

    def next_address(self, k: int) -> str:
        """Stage k+1's address as stage k reaches it over the shaped link."""
        return f"10.{self._net + 120}.{k}.2"

    def prefix(self, k: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(k)]

    def __enter__(self) -> EmulatedLinks:
        check_available()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for k in range(self.stages):
            ns = self.ns(k)
            _run("ip", "netns", "add", ns)
            self._created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            # client link (root <-> stage k), unshaped
            root_end, ns_end = f"lc{self.tag}{k}", f"lcs{self.tag}{k}"
            _run("ip", "link", "add", root_end, "type", "veth", "peer", "name", ns_end)
            _run("ip", "link", "set", ns_end, "netns", ns)
            _run("ip", "addr", "add", f"10.{self._net}.{k}.1/24", "dev", root_end)
            _run("ip", "link", "set", root_end, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.client_address(k)}/24", "dev", ns_end)
            _run("ip", "-n", ns, "link", "set", ns_end, "up")
        for k in range(self.stages - 1):
            a, b = self.ns(k), self.ns(k + 1)
            a_end, b_end = f"la{self.tag}{k}", f"lb{self.tag}{k}"
            _run("ip", "link", "add", a_end, "netns", a, "type", "veth", "peer", "name", b_end, "netns", b)  # fmt: skip
            _run("ip", "-n", a, "addr", "add", f"10.{self._net + 120}.{k}.1/24", "dev", a_end)
            _run("ip", "-n", b, "addr", "add", f"{self.next_address(k)}/24", "dev", b_end)
            _run("ip", "-n", a, "link", "set", a_end, "up")
            _run("ip", "-n", b, "link", "set", b_end, "up")
            # The hand-off direction (k -> k+1) is shaped to the link's bandwidth.
            _run(
                "ip", "netns", "exec", a, "tc", "qdisc", "add", "dev", a_end, "root", "tbf",
                "rate", f"{self.rate_mbit}mbit", "burst", str(self.burst_bytes), "latency", "2s",
            )  # fmt: skip

    def close(self) -> None:
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created.clear()
        # Deleting a namespace removes its veth ends, and with them the peers in root.

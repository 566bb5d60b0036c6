"""`LAMC_AGENT=PATH lamc serve ...`: hand a stage server's start to a `lamc agent`.

A stage server started from a fresh interpreter spends most of its start importing
(numpy, ONNX Runtime, gRPC, asyncio, lamc). A `lamc agent` on the device has imported
them once; this launcher passes it the command line, the working directory, the
environment and its own standard input, output and error (as file descriptors over a
Unix socket), and the agent forks a stage server that starts with everything imported.

The launcher stays in the foreground as the server's stand-in: it forwards SIGTERM,
SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the server, and exits with the server's exit
status (128 + N when a signal N ended it). If the launcher is killed outright, the agent
kills the server (SIGKILL): to whoever started it, it is as though the server had died.

When the agent cannot be reached, or it declines (it starts servers only for launchers
of its own user, namespaces, control groups and limits), the launcher says why on stderr
and starts the server itself, as without LAMC_AGENT.

Standard library only: this runs before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

ENV = "LAMC_AGENT"
# What the launcher sends at most (command line, directory, environment).
MAX_REQUEST = 1 << 20
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def default_socket() -> str:
    """$LAMC_AGENT, else a socket in a directory of this user's own."""
    chosen = os.environ.get(ENV)
    if chosen:
        return chosen
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"lamc-agent-{os.getuid()}", "agent.sock")


def wants_agent(argv: list[str]) -> bool:
    """`lamc serve OUT --stage K ...` (a gRPC stage server): the one command an agent
    starts. `--ray` deploys on Ray Serve instead; --help and the like print and exit."""
    if argv[:1] != ["serve"]:
        return False
    rest = argv[1:]
    if any(a in ("--ray", "--help", "-h") or a.startswith("--ray=") for a in rest):
        return False
    return any(a == "--stage" or a.startswith("--stage=") for a in rest)


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack("!I", len(body)) + body


def read_message(
    conn: socket.socket, limit: int = MAX_REQUEST, start: bytes = b""
) -> dict[str, Any] | None:
    """One length-prefixed JSON object (`start`: its first bytes, received already); None
    at the end of the stream."""
    more = _read_exactly(conn, 4 - len(start))
    if more is None:
        if start:
            raise ValueError("the stream ended inside a message")
        return None
    (size,) = struct.unpack("!I", start + more)
    if size > limit:
        raise ValueError(f"a message of {size} bytes (at most {limit})")
    body = _read_exactly(conn, size)
    if body is None:
        raise ValueError("the stream ended inside a message")
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"a message that is not JSON ({exc})") from None
    if not isinstance(message, dict):
        raise ValueError("a message that is not a JSON object")
    return message


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(size - got)
        if not chunk:
            if got:
                raise ValueError("the stream ended inside a message")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _say(text: str) -> None:
    print(f"lamc: {text}", file=sys.stderr, flush=True)


def hand_over(path: str, argv: list[str]) -> int | None:
    """Have the agent at `path` run `lamc *argv`; its exit status, or None when the
    caller should run the command itself (the reason is on stderr)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = encode({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)})
        socket.send_fds(conn, [request], [0, 1, 2])
        reply = read_message(conn)
    except (OSError, ValueError) as exc:
        conn.close()
        _say(f"no agent at {path} ({exc}); starting the stage server in this process")
        return None
    if reply is None or "pid" not in reply:
        conn.close()
        why = (reply or {}).get("refused", "it closed the connection")
        _say(f"the agent at {path} declined: {why}; starting the stage server in this process")
        return None
    return _stand_in(conn, int(reply["pid"]), path)


def _stand_in(conn: socket.socket, pid: int, path: str) -> int:
    """Forward signals to the server `pid` until the agent reports its exit status."""

    def forward(number: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)

    for number in FORWARDED:
        signal.signal(number, forward)
    try:
        reply = read_message(conn)  # a forwarded signal does not interrupt it (PEP 475)
    except (OSError, ValueError):
        reply = None
    conn.close()
    if reply is not None and "exit" in reply:
        return int(reply["exit"])
    # The agent went away: the server (which it started with a parent-death signal)
    # is draining; wait for it to be gone, then say what is known.
    from lamc.atomic import alive

    while alive(pid):
        time.sleep(0.1)
    _say(f"the agent at {path} stopped; the stage server's exit status is unknown")
    return 1

"""`lamc agent`: a resident process on a device that starts stage servers with everything
already imported (`LAMC_AGENT=PATH lamc serve OUT --stage K ...`; see
`lamc.cli.handover` for the launcher's side).

The agent imports what a stage server runs on (numpy, ONNX Runtime, gRPC, asyncio, lamc's
serving modules) once, creates no session, thread pool, channel or server of its own, and
waits on a Unix socket. For each launcher it forks: the child takes the launcher's
standard streams, working directory, environment and command line, and runs `lamc serve`
as it would have run in a fresh process, minus the imports. The agent itself stays one
thread, so every fork is of a process with nothing running in it.

A started server is the launcher's in every way the launcher can tell: the agent starts
one only for a launcher of its own user, in its own namespaces (network, mount, PID, IPC,
UTS, user) and control groups, with its own resource limits, CPU affinity and niceness.
Otherwise it declines with the reason, and the launcher starts the server itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any

import click

from lamc.cli import handover
from lamc.cli.main import cli, lamc_command
from lamc.errors import ConfigError

log = logging.getLogger("lamc.agent")
NAMESPACES = ("net", "mnt", "pid", "ipc", "uts", "user")
# Lines of /proc/PID/status a forked server would take from the agent, not the launcher.
CREDENTIALS = (
    "Umask",
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
)
PR_SET_PDEATHSIG = 1
# The modules a stage server runs on, imported once here instead of at every start.
PRELOAD = (
    "numpy",
    "onnxruntime",
    "grpc",
    "grpc.aio",
    "grpc_health.v1._async",
    "grpc_health.v1.health_pb2",
    "grpc_health.v1.health_pb2_grpc",
    "lamc.runtime.early",
    "lamc.runtime.loading",
    "lamc.runtime.server",
    "lamc.runtime.lifecycle",
    "lamc.runtime.reconfigure",
    "lamc.runtime.executor",
    "lamc.runtime.stamps",
    "lamc.backends.onnxruntime.run",
    "lamc.cli.serve_cmd",
)


def preload() -> list[str]:
    """Import PRELOAD; the modules that could not be (their servers import them later)."""
    import importlib

    missing = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and uid (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


def _setting(pid: int) -> dict[str, Any]:
    """What process `pid` (0: this one) runs under that a forked server would take from
    the agent."""
    import resource

    where = Path(f"/proc/{pid or 'self'}")
    limits = {}
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            with contextlib.suppress(OSError, ValueError):
                limits[name] = resource.prlimit(pid, getattr(resource, name))
    status = dict(
        line.split(":", 1) for line in (where / "status").read_text().splitlines() if ":" in line
    )
    return {
        "namespaces": {n: os.stat(where / "ns" / n).st_ino for n in NAMESPACES},
        "credentials (umask, ids, groups, capabilities, seccomp)": {
            key: status.get(key, "").strip() for key in CREDENTIALS
        },
        "control groups": (where / "cgroup").read_text(),
        "resource limits": limits,
        "CPU affinity": sorted(os.sched_getaffinity(pid)),
        "niceness": os.getpriority(os.PRIO_PROCESS, pid),
    }


def mismatch(pid: int) -> str | None:
    """Why a server forked from this agent would not run as launcher `pid` would, or None."""
    try:
        theirs = _setting(pid)
    except OSError as exc:
        return f"cannot read the launcher's settings ({exc})"
    ours = _setting(0)
    for key, value in ours.items():
        if theirs[key] != value:
            return f"the launcher and the agent differ in {key}"
    return None


class Agent:
    """The fork server: one listening socket, one connection per running server."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # server pid -> the connection to its launcher (None once the launcher is gone)
        self.children: dict[int, socket.socket | None] = {}
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def bind(self) -> None:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
        info = directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"{directory}: the agent's socket directory must be yours and writable by "
                "you alone",
                hint="choose another with --socket",
            )
        if self.path.is_symlink() or (
            self.path.exists() and not stat.S_ISSOCK(self.path.stat().st_mode)
        ):
            raise ConfigError(f"{self.path}: exists and is not a socket; not replacing it")
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # left by an agent that is gone
            else:
                raise ConfigError(f"{self.path}: an agent already listens there")
            finally:
                probe.close()
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(16)

    def run(self) -> int:
        """Serve launchers until SIGTERM or SIGINT; then stop every server (SIGTERM: each
        drains) and wait for them. The number of servers started."""
        started = 0
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(number, self._note)
        self.selector.register(self.listener, selectors.EVENT_READ, "listen")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while not (self.stopping and not self.children):
                for key, _ in self.selector.select():
                    if key.data == "listen":
                        try:
                            started += self._accept()
                        except Exception as exc:  # one launcher never stops the agent
                            log.warning("agent: a launcher's request failed: %r", exc)
                    elif key.data == "wake":
                        self._woken()
                    else:
                        self._launcher_left(key.data)
        finally:
            signal.set_wakeup_fd(-1)
            with contextlib.suppress(OSError):
                self.path.unlink()
        return started

    def _note(self, number: int, _frame: Any) -> None:
        pass  # the wake-up fd carries the signal's number to the loop

    def _woken(self) -> None:
        numbers = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := self.wake_r.recv(4096):
                numbers += chunk
        if any(n in (signal.SIGTERM, signal.SIGINT) for n in numbers) and not self.stopping:
            self.stopping = True
            self.selector.unregister(self.listener)
            self.listener.close()
            log.info("agent: stopping; %d server(s) to drain", len(self.children))
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        self._reap()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            log.info("agent: server %d exited (%d)", pid, code)
            if conn is not None:
                self.selector.unregister(conn)
                with contextlib.suppress(OSError):
                    conn.sendall(handover.encode({"exit": code}))
                conn.close()

    def _launcher_left(self, pid: int) -> None:
        """The launcher's end of the connection closed (or spoke out of turn) while its
        server runs: it was killed, so the server is too."""
        conn = self.children.get(pid)
        if conn is None:
            return
        with contextlib.suppress(OSError):
            if conn.recv(1, socket.MSG_PEEK):
                conn.recv(4096)  # nothing is expected; read and ignore it
                return
        self.selector.unregister(conn)
        conn.close()
        self.children[pid] = None  # reaped when it has died
        log.info("agent: the launcher of server %d is gone; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _accept(self) -> int:
        conn, _ = self.listener.accept()
        conn.settimeout(2.0)  # a launcher sends its request at once
        fds: list[int] = []
        pid = 0
        try:
            pid, uid = _peer(conn)
            # The descriptors arrive with the first bytes: the length, read here.
            start, fds, _flags, _address = socket.recv_fds(conn, 4, 3)
            request = self._request(conn, start, fds, pid, uid)
        except (OSError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(handover.encode({"refused": str(exc) or type(exc).__name__}))
            conn.close()
            log.info("agent: declined launcher %d: %s", pid, exc)
            return 0
        sys.stdout.flush()
        sys.stderr.flush()
        child = os.fork()
        if child == 0:
            self._become_server(conn, fds, request)  # never returns
        for fd in fds:
            os.close(fd)
        conn.settimeout(None)
        self.children[child] = conn
        self.selector.register(conn, selectors.EVENT_READ, child)
        with contextlib.suppress(OSError):
            conn.sendall(handover.encode({"pid": child}))
        log.info(
            "agent: server %d started for launcher %d: lamc %s",
            child,
            pid,
            " ".join(request["argv"]),
        )
        return 1

    def _request(
        self, conn: socket.socket, start: bytes, fds: list[int], pid: int, uid: int
    ) -> dict[str, Any]:
        if uid != os.getuid():
            raise ValueError(f"the launcher runs as user {uid}, the agent as {os.getuid()}")
        if len(fds) != 3:
            raise ValueError(f"the launcher passed {len(fds)} file descriptors, not 3")
        request = handover.read_message(conn, start=start) if start else None
        if request is None:
            raise ValueError("the launcher sent no request")
        argv, cwd, env = request.get("argv"), request.get("cwd"), request.get("env")
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            raise ValueError("the request's argv is not a list of strings")
        if not handover.wants_agent(argv):
            raise ValueError("an agent starts gRPC stage servers only (lamc serve OUT --stage K)")
        if not isinstance(cwd, str) or not os.path.isdir(cwd):
            raise ValueError(f"the launcher's working directory {cwd!r} is not a directory here")
        if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
            raise ValueError("the request's environment is not a map of strings")
        why = mismatch(pid)
        if why is not None:
            raise ValueError(why)
        return {"argv": argv, "cwd": cwd, "env": env}

    def _become_server(self, conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
        """In the forked child: become `lamc serve ...` as the launcher started it."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(number, signal.SIG_DFL)
            self.selector.close()
            for other in [self.listener, self.wake_r, self.wake_w, conn, *self.children.values()]:
                if other is not None:
                    other.close()
            os.setsid()
            _die_with_parent()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            logging.getLogger("lamc.agent").handlers.clear()
            sys.argv = ["lamc", *request["argv"]]
            from lamc.cli.entry import main

            main(handover=False)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _die_with_parent() -> None:
    """SIGTERM this process (a server: it drains) if the agent dies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@cli.command("agent")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to listen on (default: $LAMC_AGENT, else "
    "$XDG_RUNTIME_DIR/lamc-agent-UID/agent.sock, or under /tmp).",
)
@lamc_command("agent")
def agent_command(socket_path: Path | None) -> str:
    """Start stage servers fast: import once, then fork a `lamc serve` for every launcher
    that sets LAMC_AGENT to this socket. Runs until SIGTERM (its servers drain first)."""
    if not sys.platform.startswith("linux"):
        raise ConfigError("lamc agent runs on Linux (it checks launchers through /proc)")
    path = socket_path or Path(handover.default_socket())
    # The agent's own log; the root logger is left alone for the servers it starts.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # numpy's BLAS would start a thread pool at import that a stage server never uses
    # (ONNX Runtime does its arithmetic); without it there is one thread fewer to fork past.
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    missing = preload()
    agent = Agent(path.absolute())
    agent.bind()
    print(
        f"lamc agent listening on {agent.path} (pid {os.getpid()}); start stage servers "
        f"from it with: LAMC_AGENT={agent.path} lamc serve OUT --stage K ...",
        flush=True,
    )
    if missing:
        print(f"not preloaded (not installed): {', '.join(missing)}", flush=True)
    started = agent.run()
    return f"stopped after starting {started} stage server(s)"

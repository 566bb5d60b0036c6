"""Console output shared by all commands: tables on stdout, progress on a terminal only,
and one final `PASSED …` / `FAILED …` line.

Progress is shown when stderr is a terminal and `CI` is not set; in CI and in pipes lamc
prints results only. With `--json` the JSON is all of stdout and the final line goes to
stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a console is made: `lamc serve` starts without rich
    from rich.console import Console


QUIET = False  # `lamc -q`: tables and progress off; the final line and --json's JSON stay


def interactive() -> bool:
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return sys.stderr.isatty() and not ci and not QUIET


def stdout_console() -> Console:
    """Results go here. Markup is off: unit, tensor and file names are printed as they are
    (`[batch, seq, 64]` is a shape, not a style)."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(highlight=False, markup=False, quiet=QUIET)
    return Console(
        width=160, highlight=False, no_color=True, soft_wrap=True, markup=False, quiet=QUIET
    )


def stderr_console() -> Console:
    from rich.console import Console

    if sys.stderr.isatty():
        return Console(stderr=True, highlight=False)
    return Console(stderr=True, width=160, highlight=False, no_color=True, soft_wrap=True)


class Steps:
    """Named steps of a long command, timed; a spinner on a terminal, silence elsewhere."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._console = stderr_console()
        self._live = interactive()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        if self._live:
            with self._console.status(f"{name} …"):
                yield
        else:
            yield
        elapsed = time.perf_counter() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        if self._live:
            self._console.print(f"[green]✓[/green] {name} [dim]{elapsed:.1f} s[/dim]")


def final_line(ok: bool, text: str, *, to_stderr: bool = False) -> None:
    """The last line of every command."""
    line = f"{'PASSED' if ok else 'FAILED'} {text}"
    stream = sys.stderr if to_stderr else sys.stdout
    stream.flush()
    print(line, file=stream, flush=True)


def write_json(path: Path, data: object) -> None:
    """`-o FILE`: what --json prints, written beside FILE and renamed into place."""
    import json

    from lamc.atomic import replace_file

    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, lambda tmp: tmp.write_text(text))

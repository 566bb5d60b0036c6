"""`lamc`: the command group, and the error handling every command shares.

Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad topology or config, 4 model capture
failed, 5 op unsupported by the backend, 6 does not fit the devices (memory,
constraints or budgets), 7 accuracy check failed, 8 engine build failed, 9 integrity
check failed, 10 environment (missing runtime/provider), 130 interrupted.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

from lamc import __version__
from lamc.cli.ui import final_line
from lamc.errors import ExitCode, LamcError

F = TypeVar("F", bound=Callable[..., Any])
BUG_URL = "https://github.com/lamc-project/lamc/issues"


class CommandOutcome(Exception):
    """Raised by a command to end with a FAILED line and an exit code without a traceback."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def lamc_command(name: str) -> Callable[[F], F]:
    """Wrap a command body: its return value is the PASSED text; errors map to exit codes."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            to_stderr = bool(kwargs.get("as_json"))
            try:
                text = fn(*args, **kwargs)
            except LamcError as exc:
                if exc.hint:
                    print(f"hint: {exc.hint}", file=sys.stderr if to_stderr else sys.stdout)
                final_line(False, f"{name}: {exc.message}", to_stderr=to_stderr)
                sys.exit(int(exc.exit_code))
            except CommandOutcome as outcome:
                final_line(False, f"{name}: {outcome.text}", to_stderr=to_stderr)
                sys.exit(outcome.code)
            except KeyboardInterrupt:
                final_line(False, f"{name}: interrupted", to_stderr=to_stderr)
                sys.exit(int(ExitCode.INTERRUPTED))
            except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
                raise
            except click.ClickException:
                raise
            except Exception as exc:
                traceback.print_exc()
                print(
                    f"This is a bug in lamc {__version__}; please report it with the traceback above: {BUG_URL}",
                    file=sys.stderr,
                )
                final_line(
                    False,
                    f"{name}: internal error: {type(exc).__name__}: {exc}",
                    to_stderr=to_stderr,
                )
                sys.exit(int(ExitCode.INTERNAL))
            final_line(True, f"{name} {text}".rstrip(), to_stderr=to_stderr)

        return wrapper  # type: ignore[return-value]

    return decorate


class LamcGroup(click.Group):
    """Usage errors also end with a FAILED line (exit 2)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(int(ExitCode.USAGE))
        except click.UsageError as exc:
            exc.show()
            final_line(False, f"usage: {exc.format_message()}")
            sys.exit(int(ExitCode.USAGE))
        except click.ClickException as exc:
            exc.show()
            final_line(False, exc.format_message())
            sys.exit(int(ExitCode.USAGE))
        except click.exceptions.Abort:
            final_line(False, "interrupted")
            sys.exit(int(ExitCode.INTERRUPTED))
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)


EXIT_CODES = """\b
Exit codes:
  0  ok                      6   does not fit (memory, constraints, budgets)
  1  internal error (a bug)  7   accuracy check failed
  2  usage, bad input        8   engine build failed
  3  bad topology or config  9   integrity check failed (tampered artifact)
  4  model capture failed    10  environment (missing runtime or extra)
  5  op not supported        130 interrupted
Every command ends with one PASSED or FAILED line.
Shell completion (bash; zsh and fish alike): eval "$(_LAMC_COMPLETE=bash_source lamc)"
"""


def versions() -> list[tuple[str, str]]:
    """lamc's version and those of the runtimes and libraries it runs on."""
    import platform
    from importlib import metadata

    found = [("lamc", __version__), ("python", platform.python_version())]
    for package in (
        "onnxruntime",
        "onnxruntime-gpu",
        "numpy",
        "grpcio",
        "protobuf",
        "onnx",
        "torch",
        "transformers",
        "tensorrt",
        "ray",
    ):
        try:
            found.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            if package in ("onnxruntime", "numpy", "grpcio", "protobuf"):
                found.append((package, "not installed"))
    return found


def _show_version(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    for name, version in versions():
        click.echo(f"{name} {version}" if name == "lamc" else f"  {name} {version}")
    try:
        import onnxruntime

        click.echo(f"  execution providers: {', '.join(onnxruntime.get_available_providers())}")
    except ImportError:
        pass
    ctx.exit(0)


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if ctx.resilient_parsing:
        return
    if param.name == "quiet":
        from lamc.cli import ui

        ui.QUIET = value  # set on every invocation (in-process callers run several)
    elif value:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("lamc").setLevel(logging.DEBUG)


@click.group(
    cls=LamcGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES,
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show lamc's version and its runtimes' (ONNX Runtime and its providers, ...), and exit.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    expose_value=False,
    callback=_verbosity,
    help="Print only the final PASSED/FAILED line (and --json's JSON).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    expose_value=False,
    callback=_verbosity,
    help="Log what lamc does (debug level) on stderr.",
)
def cli() -> None:
    """lamc: compile a large model into a pipeline of per-device engines and run it."""


def main() -> None:
    # Importing only the command asked for keeps a stage server's start short.
    from lamc.cli.commands import register

    register(next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None))
    cli.main(prog_name="lamc")

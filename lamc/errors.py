"""Errors and exit codes.

User errors are `LamcError` subclasses: each carries its documented exit code, a one-line
message naming what was wrong and where, and an optional hint. Anything else that escapes
is an internal error (exit 1) and asks for a bug report.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    CAPTURE = 4
    UNSUPPORTED = 5
    NO_FIT = 6
    ACCURACY = 7
    BUILD = 8
    INTEGRITY = 9
    ENVIRONMENT = 10
    INTERRUPTED = 130


class LamcError(Exception):
    """A failure the user can act on; never a bug in lamc."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(LamcError):
    """Bad command line or bad input data (wrong tensor name, dtype, shape)."""

    exit_code = ExitCode.USAGE


class ConfigError(LamcError):
    """A topology, constraint or configuration file is invalid."""

    exit_code = ExitCode.CONFIG


class CaptureError(LamcError):
    """The model could not be loaded or captured into the IR."""

    exit_code = ExitCode.CAPTURE


class UnsupportedOpError(LamcError):
    """An operator is not supported by the chosen backend."""

    exit_code = ExitCode.UNSUPPORTED


class DoesNotFitError(LamcError):
    """No plan satisfies the devices' memory, the constraints or the budgets."""

    exit_code = ExitCode.NO_FIT


class AccuracyError(LamcError):
    """A numerical check against the source model failed."""

    exit_code = ExitCode.ACCURACY


class EngineBuildError(LamcError):
    """A backend failed to build an engine for a stage."""

    exit_code = ExitCode.BUILD


class IntegrityError(LamcError):
    """A compiled artifact or manifest failed verification."""

    exit_code = ExitCode.INTEGRITY


class RuntimeEnvironmentError(LamcError):
    """A runtime, execution provider or optional package is missing."""

    exit_code = ExitCode.ENVIRONMENT


class InternalError(Exception):
    """A bug in lamc: an invariant that user input cannot break was broken."""


def missing_extra(package: str, extra: str) -> RuntimeEnvironmentError:
    """The error for an optional dependency that is not installed."""
    return RuntimeEnvironmentError(
        f"this command needs the Python package {package!r}, which is not installed",
        hint=f"pip install 'lamc[{extra}]'",
    )

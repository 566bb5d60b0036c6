"""Run the `lamc` command in-process and look at its final line and exit code."""

from __future__ import annotations

from dataclasses import dataclass

from click.testing import CliRunner

from lamc.cli.commands import register
from lamc.cli.main import cli

register()  # every command


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def final(self) -> str:
        """The last line lamc printed (stdout, or stderr when stdout carries JSON)."""
        lines = [
            line
            for line in (self.stdout + self.stderr).splitlines()
            if line.startswith(("PASSED", "FAILED"))
        ]
        return lines[-1] if lines else ""


def lamc(*args: str) -> Outcome:
    runner = CliRunner()
    result = runner.invoke(cli, list(args), catch_exceptions=False)
    return Outcome(result.exit_code, result.stdout, result.stderr)

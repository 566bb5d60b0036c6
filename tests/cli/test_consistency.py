"""What every command shares: help on every option, exit codes and shell completion in
`lamc --help`, `--version` with the runtimes, `-q`, and tables that fit 80 columns."""

from __future__ import annotations

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import click

from tests.cli.helpers import lamc


def test_every_option_has_help() -> None:
    from lamc.cli.main import cli

    missing = [
        f"{name} {'/'.join(param.opts)}"
        for name, command in sorted(cli.commands.items())
        for param in command.params
        if isinstance(param, click.Option) and not param.help and not param.hidden
    ]
    assert missing == []
    assert len(cli.commands) >= 14


def test_help_lists_exit_codes_and_completion() -> None:
    out = lamc("--help")
    assert out.code == 0
    for words in (
        "Exit codes:",
        "10  environment",
        "130 interrupted",
        "_LAMC_COMPLETE=bash_source",
    ):
        assert words in out.stdout, words
    completion = subprocess.run(
        [sys.executable, "-c", "from lamc.cli.main import main; main()"],
        env={**os.environ, "_LAMC_COMPLETE": "bash_source"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completion.returncode == 0 and "_lamc_completion()" in completion.stdout


def test_version_names_the_runtimes() -> None:
    out = lamc("--version")
    assert out.code == 0
    lines = out.stdout.splitlines()
    assert lines[0].startswith("lamc ")
    assert any(line.strip().startswith("onnxruntime ") for line in lines)
    assert any("CPUExecutionProvider" in line for line in lines)


def test_quiet_prints_the_final_line_only() -> None:
    loud = lamc("inspect", "zoo:gpt2:test")
    quiet = lamc("-q", "inspect", "zoo:gpt2:test")
    assert loud.code == quiet.code == 0
    assert len(loud.stdout.splitlines()) > 5
    assert quiet.stdout.splitlines() == [loud.final]
    again = lamc("inspect", "zoo:gpt2:test")  # -q does not stick to the next command
    assert len(again.stdout.splitlines()) == len(loud.stdout.splitlines())


def test_tables_wrap_instead_of_cutting_at_80_columns() -> None:
    from rich.console import Console

    from lamc.cli.tables import Table

    table = Table("#", "unit", "kind", "params", "FLOPs", "peak act.", "cut after")
    name = "model.encoder.layer.11.attention.self.output.dense"
    table.add_row("3", name, "block (BertLayer)", "7.08 MiB", "483.18 MFLOP", "2.50 MiB", "192 KiB")
    console = Console(width=80, file=StringIO(), record=True)
    console.print(table)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    cells = "".join(line.split("│")[2].strip() for line in text.splitlines() if line.count("│") > 2)
    assert name in cells


def test_profile_needs_the_profile_extra_only() -> None:
    """`lamc profile` runs without torch and networkx; without onnx-ir it names lamc[profile]."""
    no_torch = (
        "import sys; sys.modules['torch'] = None; sys.modules['networkx'] = None;"
        "import lamc.profile, lamc.profile.probes"
    )
    done = subprocess.run(
        [sys.executable, "-c", no_torch], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    no_onnx_ir = (
        "import sys; sys.modules['onnx_ir'] = None; sys.argv = ['lamc', 'profile'];"
        "from lamc.cli.main import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", no_onnx_ir], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 10, done.stdout + done.stderr
    assert "lamc[profile]" in done.stdout + done.stderr


def test_json_and_output_files(tmp_path: Path) -> None:
    """compile --json is all of stdout; plan -o writes what plan --json prints."""
    import json

    from tests.compiled import MINIPCS

    out = lamc(
        "compile",
        "zoo:gpt2:test",
        "-t",
        str(MINIPCS),
        "--stages",
        "2",
        "-o",
        str(tmp_path / "out"),
        "--json",
    )
    assert out.code == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["plan"]["text"] and report["files"] and out.final.startswith("PASSED compile")
    printed = lamc(
        "plan", "zoo:gpt2:test", "-t", str(MINIPCS), "--json", "-o", str(tmp_path / "plan.json")
    )
    assert printed.code == 0
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(printed.stdout)

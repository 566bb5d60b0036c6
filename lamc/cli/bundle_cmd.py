"""`lamc bundle OUT --device NAME -o DIR`: the files one device needs, for every plan it
takes part in, with a manifest of their own."""

from __future__ import annotations

from pathlib import Path

import click

from lamc.cli.main import cli, lamc_command
from lamc.cli.tables import Table
from lamc.cli.ui import stdout_console
from lamc.quantity import format_bytes


@cli.command("bundle")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--device", required=True, help="The device (a name in the topology).")
@click.option(
    "-o", "target", required=True, type=click.Path(path_type=Path), help="Where to write it."
)
@lamc_command("bundle")
def bundle_command(out: Path, device: str, target: Path) -> str:
    """Write the part of a compiled OUT that DEVICE needs: the stages it runs in the primary
    plan and in every failover plan, their weights, and a manifest that verifies on its own.
    Serve it on the device with `lamc serve DIR --stage K` (K: its stage in the plan run)."""
    from lamc.bundle import bundle

    made = bundle(out, device, target)
    table = Table(title=f"{device} in {out}")
    table.add_column("plan")
    table.add_column("its stage", justify="right")
    for label, index in made.roles:
        table.add_row(label, str(index))
    stdout_console().print(table)
    return (
        f"{device} -> {target}: {made.files} file(s), {format_bytes(made.bytes)} "
        f"of the artifact's {format_bytes(made.artifact_bytes)}"
    )

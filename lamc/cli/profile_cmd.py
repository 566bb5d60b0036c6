"""`lamc profile`: measure this machine for the cost model and write a device entry."""

from __future__ import annotations

from pathlib import Path

import click

from lamc.cli.common import require_extra
from lamc.cli.main import cli, lamc_command
from lamc.cli.ui import Steps, stdout_console


@cli.command("profile")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the device entry (YAML) here; a topology can `include:` it.",
)
@click.option("--name", help="Device name in the entry (default: this host's name).")
@click.option("--host", help="Host name in the entry (default: this host's name).")
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Execution provider to measure.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Intra-op threads (0: ONNX Runtime's default, one per core).",
)
@click.option("--verbose", is_flag=True, help="Show every probe.")
@lamc_command("profile")
def profile_command(
    output: Path | None,
    name: str | None,
    host: str | None,
    provider: str,
    threads: int,
    verbose: bool,
) -> str:
    """Measure GEMM throughput per dtype, memory and cache bandwidth, per-op-class
    efficiency and overheads with ONNX Runtime on this machine."""
    # An edge device needs only onnx and onnx-ir for this (`lamc[profile]`), not torch.
    require_extra("profile", (("onnx", "onnx"), ("onnx_ir", "onnx-ir")))
    from lamc.profile import describe, profile_machine

    steps = Steps()
    with steps.step("profile"):
        profile = profile_machine(name=name, host=host, provider=provider, threads=threads)
    console = stdout_console()
    rows = describe(profile)
    for row in rows if verbose else rows[-(4 + len(profile.efficiency)) :]:
        console.print(row, markup=False)
    if output is not None:
        output.write_text(profile.to_yaml())
        console.print(f"wrote {output}")
    else:
        console.print(profile.to_yaml(), markup=False)
    fp32 = profile.peak_flops.get("fp32", 0.0) / 1e9
    return (
        f"{profile.name}: fp32 {fp32:.1f} GFLOP/s, memory {profile.memory_bandwidth / 1e9:.1f} GB/s"
        + (f", wrote {output}" if output else "")
    )

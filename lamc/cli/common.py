"""Options shared by the commands that capture a model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lamc.cli.options import parse_ranges, parse_sizes


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--dynamic, --dims, --trust-pickle, --no-weights, --kv-cache, --dump-ir."""
    fn = click.option(
        "--strict",
        is_flag=True,
        help="Fail (exit 4) when lamc cannot resolve the cost of some node (a shape it "
        "cannot infer), instead of warning and planning without it.",
    )(fn)
    fn = click.option(
        "--granularity",
        type=click.Choice(["block", "fine"]),
        default="block",
        show_default=True,
        help="Units: each repeated block, or each module inside a block (cuts inside blocks).",
    )(fn)
    fn = click.option(
        "--kv-cache",
        is_flag=True,
        help="Hugging Face causal LMs: capture with past keys/values as inputs and present ones as outputs (for lamc generate).",
    )(fn)
    fn = click.option(
        "--no-weights",
        is_flag=True,
        help="Capture shapes only (zoo and factory models built on PyTorch's meta device): plan a model larger than this machine's memory.",
    )(fn)
    fn = click.option(
        "--dump-ir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Write the IR after each pass into this directory.",
    )(fn)
    fn = click.option(
        "--adapter",
        type=click.Path(path_type=Path),
        help="Apply a fine-tuning result first: a peft LoRA adapter directory (merged into "
        "the weights), full weights (.safetensors), or a lamc train run directory.",
    )(fn)
    fn = click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow pickle weights (.bin, .pt2); they can run code when loaded.",
    )(fn)
    fn = click.option(
        "--dims",
        "dims",
        metavar="NAME=SIZE,...",
        help="Shape to analyse and plan for, e.g. batch=1,seq=128.",
    )(fn)
    fn = click.option(
        "--dynamic",
        "dynamic",
        metavar="NAME=MIN:MAX,...",
        help="Ranges of the dynamic dims, e.g. batch=1:8,seq=1:2048.",
    )(fn)
    return fn


def check_costs(analysed: Any, strict: bool) -> None:
    """Name every node whose cost lamc could not resolve: a warning on stderr, or with
    `--strict` a capture error (exit 4)."""
    from lamc.errors import CaptureError

    unresolved = analysed.captured.model.meta["lamc.analysis"].unresolved
    if not unresolved:
        return
    message = (
        f"{len(unresolved)} node(s) whose cost lamc could not resolve (a shape it cannot "
        f"infer; the plan counts less than they cost): {', '.join(unresolved)}"
    )
    if strict:
        raise CaptureError(
            message, hint="give the inputs' sizes with --dims, or export the model with shapes"
        )
    click.echo(f"warning: {message}", err=True)


def analyse_model(model: str, options: dict[str, Any]) -> Any:
    """Capture and analyse MODEL as `model_options` ask (the commands that plan)."""
    analysed = _analyse(model, options)
    check_costs(analysed, bool(options.get("strict")))
    return analysed


def _analyse(model: str, options: dict[str, Any]) -> Any:
    from lamc.compiler import analyse

    return analyse(
        model,
        capture_options(
            options["dynamic"],
            options["dims"],
            options["trust_pickle"],
            options["no_weights"],
            options["kv_cache"],
            options.get("adapter"),
            options.get("labels"),
        ),
        dump_ir=options["dump_ir"],
        granularity=options["granularity"],
    )


def capture_options(
    dynamic: str | None,
    dims: str | None,
    trust_pickle: bool,
    no_weights: bool = False,
    kv_cache: bool = False,
    adapter: Path | None = None,
    labels: int | None = None,
) -> Any:
    from lamc.frontend import CaptureOptions

    return CaptureOptions(
        dynamic=parse_ranges(dynamic),
        dims=parse_sizes(dims),
        trust_pickle=trust_pickle,
        weights=not no_weights,
        kv_cache=kv_cache,
        adapter=adapter,
        labels=labels,
    )


def require_compile_extra() -> None:
    """The compile side needs torch, onnx and networkx (`lamc[compile]`)."""
    require_extra("compile", (("onnx", "onnx"), ("onnx_ir", "onnx-ir"), ("networkx", "networkx")))


def require_extra(extra: str, modules: tuple[tuple[str, str], ...]) -> None:
    """Exit 10 naming the extra that installs the first missing (module, package)."""
    from lamc.errors import missing_extra

    for module, package in modules:
        try:
            __import__(module)
        except ImportError:
            raise missing_extra(package, extra) from None

"""The options `plan` and `compile` share, and the plan request they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lamc.cli.options import parse_mapping
from lamc.codecs import CHOICES as CODEC_CHOICES
from lamc.errors import UsageError
from lamc.quantity import format_ms


def plan_options(fn: Any) -> Any:
    """Options shared by `plan` and `compile`: objective, constraints, budgets."""
    decorators = [
        click.option(
            "--topology",
            "-t",
            "topology_path",
            required=True,
            type=click.Path(dir_okay=False, path_type=Path),
            help="Topology file (YAML).",
        ),
        click.option(
            "--input-on",
            "input_on",
            multiple=True,
            metavar="INPUT=DEVICE",
            help="Where an input originates (the camera's board, the microphone's): moving "
            "it from there is charged, so its encoder can land next to it (repeat; adds to "
            "the topology's inputs:).",
        ),
        click.option(
            "--branches",
            type=click.Choice(["auto", "off"]),
            default="auto",
            show_default=True,
            help="A model whose inputs enter independent branches (CLIP's towers, an encoder "
            "per sensor): auto plans a DAG of stages, the branches side by side on devices "
            "of their own, when that beats the best chain; off: chains only.",
        ),
        click.option(
            "--replicate",
            type=click.Choice(["auto", "off"]),
            is_flag=False,
            flag_value="auto",
            default="off",
            show_default=True,
            help="auto (or the flag alone): a stage may also run on a group of devices of the "
            "same kind, requests reaching them round-robin by speed, when that raises "
            "throughput over the best chain (served on Ray Serve); off: one device a stage.",
        ),
        click.option(
            "--objective",
            type=click.Choice(["auto", "throughput", "latency", "generate"]),
            default="auto",
            show_default=True,
            help="Minimise the bottleneck (pipelined requests), the time of one request, or "
            "(decoders) prefill + --new-tokens decode steps; auto: generate for a decoder "
            "captured with its KV cache, else throughput.",
        ),
        click.option(
            "--new-tokens",
            type=click.IntRange(min=1),
            default=128,
            show_default=True,
            help="Objective generate: tokens generated per prompt.",
        ),
        click.option("--stages", type=click.IntRange(min=1), help="Use exactly this many stages."),
        click.option(
            "--failover",
            type=click.IntRange(min=0, max=3),
            is_flag=False,
            flag_value=1,
            default=None,
            help="Also plan for this many devices lost at once (each device; 2: each pair "
            "too); compile's default: 1 with 3+ devices, 0 (none) otherwise; alone: 1.",
        ),
        click.option(
            "--split-after",
            "split_after",
            metavar="UNIT,...",
            help="Cut the pipeline after these units.",
        ),
        click.option(
            "--pin",
            "pins",
            multiple=True,
            metavar="UNIT=DEVICE",
            help="Place a unit (name, #index or glob) on a device.",
        ),
        click.option(
            "--forbid",
            "forbids",
            multiple=True,
            metavar="UNIT=DEVICE",
            help="Keep a unit off a device.",
        ),
        click.option("--exclude", metavar="DEVICE,...", help="Leave these devices out."),
        click.option(
            "--colocate",
            "colocates",
            multiple=True,
            metavar="UNIT+UNIT",
            help="Keep these units in one stage.",
        ),
        click.option(
            "--max-latency-ms",
            type=click.FloatRange(min=0, min_open=True),
            help="Budget: one request end to end.",
        ),
        click.option(
            "--min-throughput",
            type=click.FloatRange(min=0, min_open=True),
            help="Budget: requests per second.",
        ),
        click.option(
            "--min-memory-headroom",
            metavar="FRACTION",
            help="Budget: memory left free on every device, e.g. 10%.",
        ),
        click.option(
            "--context",
            type=click.IntRange(min=1),
            help="Decoders: plan the KV cache for this many tokens of context.",
        ),
        click.option(
            "--batch",
            "kv_batch",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Decoders: sequences whose KV cache is held at once.",
        ),
        click.option(
            "--compress",
            "compress",
            metavar="SPEC",
            help="Compress stages: auto (the planner chooses per stage), METHOD, or "
            "DEVICE_OR_KIND=METHOD,... (methods as the README's compression table lists them; "
            "an unknown name lists them too).",
        ),
        click.option(
            "--codec",
            type=click.Choice(list(CODEC_CHOICES)),
            default="raw",
            show_default=True,
            help="How activations travel between stages; auto: the smallest within --max-error.",
        ),
        click.option(
            "--max-error",
            type=click.FloatRange(min=0, min_open=True),
            default=0.01,
            show_default=True,
            help="Accuracy budget: max |out - ref| / max |ref| of the model outputs.",
        ),
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def plan_request(
    objective: str,
    stages: int | None,
    split_after: str | None,
    pins: tuple[str, ...],
    forbids: tuple[str, ...],
    exclude: str | None,
    colocates: tuple[str, ...],
    max_latency_ms: float | None,
    min_throughput: float | None,
    min_memory_headroom: str | None,
    kv_tokens: int,
    compare: bool,
    codec: str = "raw",
    context: int = 0,
    new_tokens: int = 128,
    input_on: tuple[str, ...] = (),
    branches: str = "auto",
    replicate: str = "off",
) -> Any:
    from lamc.passes.partition.planner import PlanRequest
    from lamc.topology import Budgets, Constraints, parse_fraction

    forbid: dict[str, tuple[str, ...]] = {}
    for unit, device in parse_mapping(forbids, "--forbid").items():
        forbid[unit] = (*forbid.get(unit, ()), *device.split("|"))
    headroom = None
    if min_memory_headroom is not None:
        try:
            headroom = parse_fraction(min_memory_headroom)
        except ValueError as exc:
            raise UsageError(f"--min-memory-headroom: {exc}") from None
    constraints = Constraints(
        stages=stages,
        split_after=tuple(s.strip() for s in (split_after or "").split(",") if s.strip()),
        pin=parse_mapping(pins, "--pin"),
        forbid=forbid,
        exclude=tuple(s.strip() for s in (exclude or "").split(",") if s.strip()),
        colocate=tuple(
            tuple(p.strip() for p in group.split("+") if p.strip()) for group in colocates
        ),
    )
    budgets = Budgets(
        max_latency_ms=max_latency_ms, min_throughput=min_throughput, min_memory_headroom=headroom
    )
    return PlanRequest(
        objective=objective,
        constraints=constraints,
        budgets=budgets,
        kv_tokens=kv_tokens,
        compare=compare,
        codec=codec,
        context=context,
        new_tokens=new_tokens,
        input_origins=parse_mapping(input_on, "--input-on"),
        branches=branches,
        replicate=replicate,
    )


def request_from_options(options: dict[str, Any], compare: bool) -> Any:
    """The plan request the shared options describe."""
    kv_tokens = (options.get("context") or 0) * (options.get("kv_batch") or 1)
    return plan_request(
        options["objective"],
        options["stages"],
        options["split_after"],
        options["pins"],
        options["forbids"],
        options["exclude"],
        options["colocates"],
        options["max_latency_ms"],
        options["min_throughput"],
        options["min_memory_headroom"],
        kv_tokens,
        compare,
        options.get("codec") or "raw",
        options.get("context") or 0,
        options.get("new_tokens") or 128,
        tuple(options.get("input_on") or ()),
        options.get("branches") or "auto",
        options.get("replicate") or "off",
    )


def describe(model: str, best: Any) -> str:
    return (
        f"{model} on {best.topology}: {len(best.stages)} stage(s), bottleneck {format_ms(best.bottleneck_ms)} "
        f"({best.throughput_rps:.3g} req/s), latency {format_ms(best.latency_ms)}"
    )

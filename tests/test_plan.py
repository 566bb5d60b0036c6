"""A plan is a value: immutable, with a compact text form of its placement that parses
back, and the same figures from every command that plans (they all call plan_model)."""

from __future__ import annotations

import dataclasses

import pytest

from lamc.passes.partition.planner import PlanRequest, plan
from lamc.plan import Placement, format_placement, parse_placement
from lamc.topology import parse_topology
from tests.synthetic import chain, device_yaml

TOPOLOGY = (
    "lamc_topology: 1\nname: three\ndevices:\n"
    + device_yaml("a", tflops=1.0, memory="1GiB")
    + device_yaml("b", tflops=2.0, memory="1GiB")
    + device_yaml("c", tflops=1.0, memory="1GiB")
    + "links:\n  - {a: a, b: b, bandwidth: 10Gbit/s, latency: 0.1ms}\n"
    + "  - {a: b, b: c, bandwidth: 10Gbit/s, latency: 0.1ms}\n"
)


def test_text_form_round_trips() -> None:
    best, _ = plan(
        chain(12, params=200 * 2**20), parse_topology(TOPOLOGY), PlanRequest(codec="fp16")
    )
    assert len(best.stages) > 1
    text = best.text
    assert parse_placement(text) == best.placement
    assert format_placement(parse_placement(text)) == text
    first = best.stages[0]
    assert text.startswith(f"{first.device}[0:{first.end_unit}]fp32 >fp16> ")


def test_text_form_examples() -> None:
    stages = parse_placement("laptop[0:7]fp32 >raw> jetson[7:13]int8-dynamic")
    assert stages == (
        Placement("laptop", 0, 7, "fp32", "raw"),
        Placement("jetson", 7, 13, "int8-dynamic", "raw"),
    )
    assert parse_placement("pc[0:3]fp16") == (Placement("pc", 0, 3, "fp16"),)


@pytest.mark.parametrize(
    ("text", "wrong"),
    [
        ("", "expected STAGE"),
        ("a[0:3]fp32 >raw>", "expected STAGE"),
        ("a[0:3]fp32 raw b[3:4]fp32", "is not >CODEC>"),
        ("a[0:3] >raw> b[3:4]fp32", "is not DEVICE[START:END]PRECISION"),
        ("a[0:3]fp32 >raw> b[4:6]fp32", "do not meet"),
        ("a[2:2]fp32", "holds no unit"),
    ],
)
def test_malformed_text_names_what_is_wrong(text: str, wrong: str) -> None:
    with pytest.raises(ValueError, match=wrong.replace("[", r"\[")):
        parse_placement(text)


def test_plan_is_immutable() -> None:
    best, _ = plan(chain(4), parse_topology(TOPOLOGY))
    with pytest.raises(dataclasses.FrozenInstanceError):
        best.bottleneck_ms = 0.0  # type: ignore[misc]

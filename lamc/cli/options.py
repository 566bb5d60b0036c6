"""Parsers for option values given on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def parse_ranges(text: str | None) -> dict[str, tuple[int, int]]:
    """`batch=1:8,seq=1:2048` -> {"batch": (1, 8), "seq": (1, 2048)}."""
    ranges: dict[str, tuple[int, int]] = {}
    for item in _items(text):
        name, sep, span = item.partition("=")
        low, colon, high = span.partition(":")
        try:
            if not sep or not colon:
                raise ValueError
            lo, hi = int(low), int(high)
        except ValueError:
            raise click.BadParameter(
                f"{item!r} is not NAME=MIN:MAX", param_hint="--dynamic"
            ) from None
        if not 0 <= lo <= hi:
            raise click.BadParameter(f"{item!r}: need 0 <= MIN <= MAX", param_hint="--dynamic")
        ranges[name.strip()] = (lo, hi)
    return ranges


def parse_sizes(text: str | None, option: str = "--dims") -> dict[str, int]:
    """`batch=1,seq=128` -> {"batch": 1, "seq": 128}."""
    sizes: dict[str, int] = {}
    for item in _items(text):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            size = int(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not NAME=SIZE", param_hint=option) from None
        if size < 0:
            raise click.BadParameter(f"{item!r}: size must be >= 0", param_hint=option)
        sizes[name.strip()] = size
    return sizes


def parse_mapping(values: tuple[str, ...], option: str) -> dict[str, str]:
    """Repeated `KEY=VALUE` options -> dict."""
    result: dict[str, str] = {}
    for item in values:
        for part in _items(item):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise click.BadParameter(f"{part!r} is not KEY=VALUE", param_hint=option)
            result[key.strip()] = value.strip()
    return result


def _items(text: str | None) -> list[str]:
    if not text:
        return []
    return [item.strip() for item in text.split(",") if item.strip()]


def json_file_option(fn: Any) -> Any:
    """`-o FILE`: also write what --json prints to FILE (plan, bench, validate)."""
    return click.option(
        "-o",
        "--output",
        "output_json",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Also write what --json prints to this file.",
    )(fn)

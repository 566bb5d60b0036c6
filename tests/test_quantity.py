import math

import pytest

from lamc.quantity import (
    QuantityError,
    format_bytes,
    parse_bandwidth,
    parse_bytes,
    parse_duration_ms,
    parse_flops,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * 2**30),
        ("512MB", 512e6),
        ("4096", 4096),
        ("1.5 KiB", 1536),
        (1024, 1024),
        ("2TB", 2e12),
    ],
)
def test_bytes(text: str, expected: float) -> None:
    assert parse_bytes(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1Gbit/s", 125e6),
        ("10GbE", 1.25e9),
        ("25GB/s", 25e9),
        ("800Mbps", 100e6),
        ("2.5GbE", 312.5e6),
    ],
)
def test_bandwidth(text: str, expected: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"), [("2ms", 2.0), ("150us", 0.15), ("1s", 1000.0), ("0.5", 0.5)]
)
def test_duration(text: str, expected: float) -> None:
    assert parse_duration_ms(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"), [("20TFLOPS", 20e12), ("180GFLOP/s", 180e9), ("67TOPS", 67e12)]
)
def test_flops(text: str, expected: float) -> None:
    assert parse_flops(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["8 parsecs", "GiB", "", "1e999GiB", "nan", "12XB", True, None])
def test_rejects(text: object) -> None:
    with pytest.raises(QuantityError):
        parse_bytes(text)  # type: ignore[arg-type]


def test_nan_rejected_everywhere() -> None:
    for parse in (parse_bytes, parse_bandwidth, parse_duration_ms, parse_flops):
        with pytest.raises(QuantityError):
            parse(math.nan)


def test_format() -> None:
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"

"""Human units, parsed once at the edge: `8GiB`, `1Gbit/s`, `2ms`, `67TFLOPS`.

Everything inside lamc is in bytes, bytes per second, milliseconds and FLOP/s.
"""

from __future__ import annotations

import math
import re

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_IEC = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}


class QuantityError(ValueError):
    """A value that is not a valid quantity of the expected kind."""


def _split(text: str, kind: str) -> tuple[float, str]:
    if isinstance(text, bool):
        raise QuantityError(f"expected a {kind}, got a boolean")
    if isinstance(text, (int, float)):
        return float(text), ""
    if not isinstance(text, str):
        raise QuantityError(f"expected a {kind} such as {_EXAMPLES[kind]}, got {text!r}")
    m = re.fullmatch(r"\s*" + _NUMBER + r"\s*([A-Za-z/]*)\s*", text)
    if not m:
        raise QuantityError(f"expected a {kind} such as {_EXAMPLES[kind]}, got {text!r}")
    return float(m.group(1)), m.group(2)


_EXAMPLES = {
    "size": "'8GiB' or '512MB'",
    "bandwidth": "'1Gbit/s', '10GbE' or '25GB/s'",
    "duration": "'2ms', '150us' or '1s'",
    "compute rate": "'20TFLOPS' or '180GFLOPS'",
}


def _check(value: float, kind: str, text: object) -> float:
    if math.isnan(value) or math.isinf(value):
        raise QuantityError(f"{kind} must be a finite number, got {text!r}")
    return value


def _prefix(unit: str, base: str, kind: str, text: object) -> float:
    """Multiplier of `unit` = prefix + base (base compared case-sensitively)."""
    if not unit.endswith(base):
        raise QuantityError(f"unknown unit in {kind} {text!r}")
    prefix = unit[: len(unit) - len(base)]
    if prefix in _IEC:
        return _IEC[prefix]
    if prefix in _SI:
        return _SI[prefix]
    raise QuantityError(f"unknown unit prefix {prefix!r} in {kind} {text!r}")


def parse_bytes(text: str | float) -> float:
    """A memory size in bytes: `8GiB`, `512MB`, `4096` (plain number = bytes)."""
    value, unit = _split(text, "size")  # type: ignore[arg-type]
    if unit in ("", "B"):
        return _check(value, "size", text)
    if unit.endswith("B"):
        return _check(value * _prefix(unit, "B", "size", text), "size", text)
    raise QuantityError(f"unknown unit in size {text!r} (use B, KB, MiB, GiB, ...)")


def parse_bandwidth(text: str | float) -> float:
    """A bandwidth in bytes per second: `1Gbit/s`, `10GbE`, `25GB/s`, `800Mbps`."""
    value, unit = _split(text, "bandwidth")  # type: ignore[arg-type]
    if unit == "":
        return _check(value, "bandwidth", text)
    if unit.endswith("bE"):  # Ethernet names: 1GbE, 10GbE, 2.5GbE
        return _check(value * _prefix(unit, "bE", "bandwidth", text) / 8.0, "bandwidth", text)
    for base, scale in (
        ("bit/s", 1 / 8),
        ("bps", 1 / 8),
        ("b/s", 1 / 8),
        ("B/s", 1.0),
        ("Bps", 1.0),
    ):
        if unit.endswith(base):
            return _check(value * _prefix(unit, base, "bandwidth", text) * scale, "bandwidth", text)
    raise QuantityError(f"unknown unit in bandwidth {text!r} (use bit/s, Gbit/s, GB/s, GbE)")


def parse_duration_ms(text: str | float) -> float:
    """A duration in milliseconds: `2ms`, `150us`, `1s`, `0.5` (plain number = ms)."""
    value, unit = _split(text, "duration")  # type: ignore[arg-type]
    scale = {"": 1.0, "ms": 1.0, "s": 1e3, "us": 1e-3, "ns": 1e-6, "min": 6e4}.get(unit)
    if scale is None:
        raise QuantityError(f"unknown unit in duration {text!r} (use ns, us, ms, s)")
    return _check(value * scale, "duration", text)


def parse_flops(text: str | float) -> float:
    """A compute rate in FLOP/s: `20TFLOPS`, `180GFLOP/s`, `67TOPS` (ops counted as FLOPs)."""
    value, unit = _split(text, "compute rate")  # type: ignore[arg-type]
    if unit == "":
        return _check(value, "compute rate", text)
    for base in ("FLOPS", "FLOP/s", "flops", "OPS", "ops"):
        if unit.endswith(base):
            return _check(value * _prefix(unit, base, "compute rate", text), "compute rate", text)
    raise QuantityError(f"unknown unit in compute rate {text!r} (use GFLOPS, TFLOPS)")


def format_bytes(n: float) -> str:
    """A byte count for people: `1.50 GiB`."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_flops(n: float) -> str:
    """A FLOP count for people: `32.1 GFLOP`."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def format_ms(ms: float) -> str:
    """A duration for people: `12.3 ms`, `1.20 s`, `35 us`."""
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1000:.1f} us"

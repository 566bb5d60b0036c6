"""Reading one field of a topology document, with errors that name file, line and field."""

from __future__ import annotations

import math
from typing import Any

from lamc.quantity import QuantityError
from lamc.yamlfile import LinedDict, Source, line_of, shown


def unknown_keys(mapping: LinedDict, allowed: set[str], where: str, source: Source) -> None:
    for key in mapping:
        if key not in allowed:
            raise source.error(
                line_of(mapping, key),
                f"{where}.{key}" if where else key,
                "unknown field",
                hint=f"fields here: {', '.join(sorted(allowed))}",
            )


def string(
    value: Any, source: Source, container: LinedDict, field_name: str, *, required: bool = False
) -> str:
    key = field_name.rsplit(".", 1)[-1]
    if required or value is None:
        raise source.error(
            line_of(container, key) if key in container else container.line,
            field_name,
            "is required",
        )
    if not isinstance(value, str) or not value.strip():
        raise source.error(
            line_of(container, key), field_name, f"must be a non-empty string, got {value!r}"
        )
    return value.strip()


def string_list(raw: LinedDict, key: str, where: str, source: Source) -> list[str]:
    value = raw.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise source.error(line_of(raw, key), f"{where}.{key}", "must be a list of names")
    return list(value)


def quantity(
    container: LinedDict, key: str, where: str, source: Source, parse: Any, *, positive: bool
) -> float:
    field_name = f"{where}.{key}"
    if key not in container:
        raise source.error(container.line, field_name, "is required")
    raw = container[key]
    try:
        value = float(parse(raw))
    except QuantityError as exc:
        raise source.error(line_of(container, key), field_name, str(exc)) from None
    except (OverflowError, ValueError, TypeError):
        raise source.error(
            line_of(container, key), field_name, f"is not a quantity lamc can use: {shown(raw)}"
        ) from None
    if not math.isfinite(value):
        raise source.error(line_of(container, key), field_name, f"must be finite, got {shown(raw)}")
    if positive and not value > 0:
        raise source.error(
            line_of(container, key), field_name, f"must be greater than zero, got {shown(raw)}"
        )
    if value < 0:
        raise source.error(
            line_of(container, key), field_name, f"must not be negative, got {shown(raw)}"
        )
    return value

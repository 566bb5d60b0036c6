"""YAML with line numbers: configuration errors name the file, the line and the field.

`load_yaml` composes the document node by node (safe loader, no tags) into plain dicts,
lists and scalars that remember where each value was written. Duplicate keys are an
error instead of a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lamc.errors import ConfigError

T = TypeVar("T")


class LinedDict(dict[str, Any]):
    """A mapping whose keys remember their line (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[str, int] = {}


class LinedList(list[Any]):
    """A sequence whose items remember their line (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: list[int] = []


class Source:
    """Where a document came from, for error messages."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def error(
        self, line: int | None, field: str, message: str, hint: str | None = None
    ) -> ConfigError:
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: {field}: {message}", hint=hint)


def load_yaml(path: Path) -> tuple[Any, Source]:
    source = Source(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_yaml(text, source), source


def parse_yaml(text: str, source: Source) -> Any:
    loader: _LinedLoader | None = None
    try:
        # Constructing the loader already reads the stream (and rejects control characters).
        loader = _LinedLoader(text)
        loader.source = source
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise source.error(line, "(document)", f"invalid YAML: {problem}") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise source.error(None, "(document)", f"invalid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


class _LinedLoader(yaml.SafeLoader):
    """The safe loader, building LinedDict / LinedList and refusing duplicate keys."""

    source: Source


def _construct_map(loader: _LinedLoader, node: yaml.MappingNode) -> LinedDict:
    loader.flatten_mapping(node)
    mapping = LinedDict(node.start_mark.line + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise loader.source.error(line, repr(key), "keys must be strings")
        if key in mapping:
            raise loader.source.error(line, key, "duplicate key")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


def _construct_seq(loader: _LinedLoader, node: yaml.SequenceNode) -> LinedList:
    seq = LinedList(node.start_mark.line + 1)
    for item in node.value:
        seq.append(loader.construct_object(item, deep=True))
        seq.lines.append(item.start_mark.line + 1)
    return seq


_LinedLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LinedLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def line_of(container: Any, key: str | int) -> int | None:
    """The line of `container[key]`, when known."""
    if isinstance(container, LinedDict) and isinstance(key, str):
        return container.lines.get(key, container.line)
    if (
        isinstance(container, LinedList)
        and isinstance(key, int)
        and 0 <= key < len(container.lines)
    ):
        return container.lines[key]
    return getattr(container, "line", None)


def field(
    source: Source,
    container: LinedDict,
    key: str,
    where: str,
    parse: Callable[[Any], T],
    *,
    required: bool = True,
    default: T | None = None,
    hint: str | None = None,
) -> T:
    """Read `container[key]` through `parse`; errors name the file, line and field."""
    if key not in container:
        if required:
            raise source.error(
                container.line, f"{where}.{key}" if where else key, "is required", hint=hint
            )
        return default  # type: ignore[return-value]
    try:
        return parse(container[key])
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise source.error(
            line_of(container, key), f"{where}.{key}" if where else key, str(exc), hint=hint
        ) from None

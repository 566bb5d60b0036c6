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
        if not path.is_file():  # a directory, a device such as /dev/zero, a pipe
            if not path.exists():
                raise ConfigError(f"{path}: file not found")
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB: not a topology")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_yaml(text, source), source


# Topology and device files are small: a larger one is a mistake (or /dev/zero).
MAX_FILE_BYTES = 16 << 20
# A document is read as the tree its aliases stand for: more nodes than this (an alias
# bomb, nested anchors that multiply) is refused before anything walks it.
MAX_NODES = 100_000


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` for an error message, cut to `limit` characters (values from a file
    may be huge: never copy them whole into a message)."""
    import reprlib

    brief = reprlib.Repr()
    brief.maxstring = brief.maxother = brief.maxlong = limit
    brief.maxlevel, brief.maxlist, brief.maxdict = 2, 6, 6
    text = brief.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_yaml(text: str, source: Source) -> Any:
    loader: _LinedLoader | None = None
    try:
        # Constructing the loader already reads the stream (and rejects control characters).
        loader = _LinedLoader(text)
        loader.source = source
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_NODES:
            raise source.error(
                None,
                "(document)",
                f"the document expands to more than {MAX_NODES} values through its aliases "
                "(anchors used inside anchors); write the values out",
            )
        return loader.construct_document(node)
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


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is replaced by what it names,
    counted on the node graph (each shared node once, with its expanded size)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: a node inside itself is infinite
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if ready or not children:
            total = 1 + sum(sizes.get(id(c), MAX_NODES + 1) for c in children)
            sizes[id(node)] = min(total, MAX_NODES + 1)
            open_nodes.discard(id(node))
            continue
        if any(id(c) in open_nodes or c is node for c in children):
            return MAX_NODES + 1
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


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

"""Loading a topology file: the document's sections, each validated, every error naming
file, line and field."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lamc.errors import ConfigError
from lamc.quantity import parse_bandwidth, parse_duration_ms
from lamc.topology.constraints import budgets_from, constraints_from
from lamc.topology.devices import device_from
from lamc.topology.fields import quantity, string, unknown_keys
from lamc.topology.model import Device, Link, Topology
from lamc.yamlfile import LinedDict, LinedList, Source, line_of, load_yaml, parse_yaml


def load_topology(path: Path | str) -> Topology:
    """Load and validate a topology file; errors are ConfigError (exit 3)."""
    path = Path(path)
    doc, source = load_yaml(path)
    topology = topology_from_document(doc, source, base=path.parent)
    topology.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return topology


def parse_topology(text: str, name: str = "<topology>") -> Topology:
    """Validate a topology given as text (tests, generated topologies)."""
    source = Source(name)
    topology = topology_from_document(parse_yaml(text, source), source, base=Path.cwd())
    topology.sha256 = hashlib.sha256(text.encode()).hexdigest()
    return topology


T = TypeVar("T")

_TOP_KEYS = {
    "lamc_topology",
    "name",
    "client",
    "inputs",
    "defaults",
    "devices",
    "links",
    "constraints",
    "budgets",
}


class _Errors:
    """Every error of a document, one per entry (a device, a link, a section): a user fixes
    a file in one pass instead of one error per run."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.found: list[ConfigError] = []

    def attempt(self, read: Callable[[], T]) -> T | None:
        try:
            return read()
        except ConfigError as exc:
            self.found.append(exc)
            return None

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            lines = "\n".join(f"  {e.message}" for e in self.found)
            raise ConfigError(
                f"{self.source.path}: {len(self.found)} errors:\n{lines}",
                hint=next((e.hint for e in self.found if e.hint), None),
            )


def topology_from_document(doc: Any, source: Source, base: Path) -> Topology:
    if not isinstance(doc, LinedDict):
        raise source.error(
            None, "(document)", "a topology is a mapping with `devices:` and `links:`"
        )
    errors = _Errors(source)
    errors.attempt(lambda: unknown_keys(doc, _TOP_KEYS, "", source))
    version = doc.get("lamc_topology", 1)
    if version != 1 or isinstance(version, bool):
        raise source.error(
            line_of(doc, "lamc_topology"),
            "lamc_topology",
            f"unsupported version {version!r} (this lamc reads 1)",
        )
    name = errors.attempt(
        lambda: string(doc.get("name", Path(source.path).stem), source, doc, "name")
    )
    host_link = errors.attempt(lambda: _host_link(doc, source)) or (16e9, 0.01)

    raw_devices = doc.get("devices")
    if not isinstance(raw_devices, LinedList) or not raw_devices:
        raise source.error(
            line_of(doc, "devices"), "devices", "must be a non-empty list of devices"
        )
    devices: list[Device] = []
    # Names of entries that failed too, so that links to them add no second error.
    declared: set[str] = set()
    for i, entry in enumerate(raw_devices):
        where = f"devices[{i}]"
        if not isinstance(entry, LinedDict):
            errors.found.append(source.error(line_of(raw_devices, i), where, "must be a mapping"))
            continue
        for key in ("name", "host"):
            if isinstance(entry.get(key), str):
                declared.add(entry[key])
        device = errors.attempt(lambda e=entry, w=where: device_from(e, w, source, base))  # type: ignore[misc]
        if device is not None:
            devices.append(device)
    seen: set[str] = set()
    for d in devices:
        if d.name in seen:
            errors.found.append(
                source.error(d.line, "devices.name", f"duplicate device name {d.name!r}")
            )
        seen.add(d.name)
    hosts = {d.host for d in devices}
    names = {d.name for d in devices}
    if names & {f"host:{h}" for h in hosts}:
        errors.found.append(
            source.error(None, "devices", "device names may not start with 'host:'")
        )

    links: list[Link] = []
    raw_links = doc.get("links", LinedList(line_of(doc, "links") or 0))
    if not isinstance(raw_links, LinedList):
        errors.found.append(source.error(line_of(doc, "links"), "links", "must be a list"))
        raw_links = LinedList(0)
    for i, entry in enumerate(raw_links):
        link = errors.attempt(
            lambda e=entry, k=i: _link(e, k, raw_links, source, names, hosts, declared)  # type: ignore[misc]
        )
        if link is not None:
            links.append(link)
    pairs = [frozenset((link.a, link.b)) for link in links]
    for i, pair in enumerate(pairs):
        if pair in pairs[:i]:
            errors.found.append(
                source.error(
                    links[i].line,
                    f"links[{i}]",
                    f"a second link between {' and '.join(sorted(pair))}",
                )
            )
    client = errors.attempt(lambda: _client(doc, source, names, hosts))
    inputs = errors.attempt(lambda: _inputs(doc, source, names, hosts))
    constraints = errors.attempt(
        lambda: constraints_from(doc.get("constraints"), doc, source, names)
    )
    budgets = errors.attempt(lambda: budgets_from(doc.get("budgets"), doc, source))
    errors.raise_any()
    assert name is not None and constraints is not None and budgets is not None
    topology = Topology(
        name=name,
        devices=tuple(devices),
        links=tuple(links),
        client=client,
        host_link=host_link,
        path=source.path,
        inputs=inputs or {},
    )
    topology.constraints = constraints
    topology.budgets = budgets
    return topology


def _host_link(doc: LinedDict, source: Source) -> tuple[float, float] | None:
    defaults = doc.get("defaults")
    if defaults is None:
        return None
    if not isinstance(defaults, LinedDict):
        raise source.error(line_of(doc, "defaults"), "defaults", "must be a mapping")
    unknown_keys(defaults, {"host_link"}, "defaults", source)
    hl = defaults.get("host_link")
    if hl is None:
        return None
    if not isinstance(hl, LinedDict):
        raise source.error(
            line_of(defaults, "host_link"), "defaults.host_link", "must be a mapping"
        )
    return (
        quantity(hl, "bandwidth", "defaults.host_link", source, parse_bandwidth, positive=True),
        quantity(hl, "latency", "defaults.host_link", source, parse_duration_ms, positive=False),
    )


def _link(
    entry: Any,
    i: int,
    raw_links: LinedList,
    source: Source,
    names: set[str],
    hosts: set[str],
    declared: set[str],
) -> Link | None:
    where = f"links[{i}]"
    if not isinstance(entry, LinedDict):
        raise source.error(line_of(raw_links, i), where, "must be a mapping")
    unknown_keys(entry, {"a", "b", "bandwidth", "latency"}, where, source)
    ends = []
    for key in ("a", "b"):
        end = string(entry.get(key), source, entry, f"{where}.{key}", required=key not in entry)
        if end not in names and end not in hosts:
            if end in declared:
                return None  # its device entry is wrong, and says so
            raise source.error(
                line_of(entry, key),
                f"{where}.{key}",
                f"unknown endpoint {end!r}",
                hint=f"link ends are device names ({', '.join(sorted(names))}) or hosts ({', '.join(sorted(hosts))})",
            )
        ends.append(end)
    if ends[0] == ends[1]:
        raise source.error(entry.line, where, f"a link from {ends[0]!r} to itself")
    return Link(
        ends[0],
        ends[1],
        quantity(entry, "bandwidth", where, source, parse_bandwidth, positive=True),
        quantity(entry, "latency", where, source, parse_duration_ms, positive=False),
        line=entry.line,
    )


def _inputs(doc: LinedDict, source: Source, names: set[str], hosts: set[str]) -> dict[str, str]:
    """`inputs: {pixel_values: camera-board}`: where each model input originates."""
    raw = doc.get("inputs")
    if raw is None:
        return {}
    if not isinstance(raw, LinedDict):
        raise source.error(line_of(doc, "inputs"), "inputs", "must map input names to devices")
    found = {}
    for name, where in raw.items():
        origin = string(where, source, raw, f"inputs.{name}")
        if origin not in names and origin not in hosts:
            raise source.error(
                line_of(raw, name), f"inputs.{name}", f"unknown device or host {origin!r}"
            )
        found[str(name)] = origin
    return found


def _client(doc: LinedDict, source: Source, names: set[str], hosts: set[str]) -> str | None:
    client = doc.get("client")
    if client is None:
        return None
    client = string(client, source, doc, "client")
    if client not in names and client not in hosts:
        raise source.error(line_of(doc, "client"), "client", f"unknown device or host {client!r}")
    return str(client)

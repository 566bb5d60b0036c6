"""A fast yes/no check of a document against one of lamc's own JSON schemas.

`jsonschema` walks a schema anew for every value it checks, which costs a stage server
a quarter of a second on a manifest that carries failover plans. This compiles a schema
once into nested closures that answer only "valid or not". The keywords lamc's schemas
use are supported, with JSON Schema 2020-12's meaning; any other keyword is refused when
the schema is compiled, so a schema cannot quietly outgrow the checker. A document the
closures refuse is checked again by `jsonschema`, which names what is wrong: the error
messages are jsonschema's, and it stays the reference (tests compare the two).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]

# Keywords that do not constrain a value.
_ANNOTATIONS = {
    "$schema",
    "$id",
    "$defs",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
}


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON Schema means it (`enum`, `const`, `uniqueItems`): true is not 1,
    1 is 1.0, and containers compare element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    return bool(a == b)


class UnsupportedSchema(ValueError):
    """The schema uses something this checker does not implement."""


class _Compiler:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.refs: dict[str, Check] = {}

    def ref(self, pointer: str) -> Check:
        if not pointer.startswith("#/"):
            raise UnsupportedSchema(f"$ref {pointer!r}: only references inside the schema")
        if pointer not in self.refs:
            target: Any = self.root
            for part in pointer[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise UnsupportedSchema(f"$ref {pointer!r} points at nothing")
                target = target[part]
            slot: list[Check] = []
            # Set before compiling the target, so a recursive reference finds it.
            self.refs[pointer] = lambda v: slot[0](v)
            slot.append(self.compile(target))
        return self.refs[pointer]

    def compile(self, schema: Any) -> Check:
        if schema is True:
            return lambda v: True
        if schema is False:
            return lambda v: False
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"a schema is an object or a boolean, not {schema!r}")
        checks: list[Check] = []
        for key, rule in schema.items():
            if key in _ANNOTATIONS:
                continue
            make = getattr(self, "k_" + key.lstrip("$"), None)
            if make is None:
                raise UnsupportedSchema(f"keyword {key!r} is not supported")
            checks.append(make(rule, schema))
        if len(checks) == 1:
            return checks[0]
        return lambda v: all(c(v) for c in checks)

    # ----------------------------------------------------------------------- keywords

    def k_ref(self, rule: str, schema: Any) -> Check:
        return self.ref(rule)

    def k_type(self, rule: Any, schema: Any) -> Check:
        names = [rule] if isinstance(rule, str) else list(rule)
        tests = [_TYPES[n] for n in names]
        return lambda v: any(t(v) for t in tests)

    def k_const(self, rule: Any, schema: Any) -> Check:
        return lambda v: json_equal(v, rule)

    def k_enum(self, rule: list[Any], schema: Any) -> Check:
        return lambda v: any(json_equal(v, option) for option in rule)

    def k_properties(self, rule: Mapping[str, Any], schema: Any) -> Check:
        checks = {name: self.compile(sub) for name, sub in rule.items()}

        def check(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            return all(c(v[name]) for name, c in checks.items() if name in v)

        return check

    def k_additionalProperties(self, rule: Any, schema: Any) -> Check:
        known = set(schema.get("properties", {}))
        if "patternProperties" in schema:
            raise UnsupportedSchema("keyword 'patternProperties' is not supported")
        extra = self.compile(rule)

        def check(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            return all(extra(item) for key, item in v.items() if key not in known)

        return check

    def k_propertyNames(self, rule: Any, schema: Any) -> Check:
        names = self.compile(rule)
        return lambda v: not isinstance(v, dict) or all(names(key) for key in v)

    def k_required(self, rule: list[str], schema: Any) -> Check:
        return lambda v: not isinstance(v, dict) or all(name in v for name in rule)

    def k_items(self, rule: Any, schema: Any) -> Check:
        if "prefixItems" in schema:
            raise UnsupportedSchema("keyword 'prefixItems' is not supported")
        item = self.compile(rule)
        return lambda v: not isinstance(v, list) or all(item(x) for x in v)

    def k_minItems(self, rule: int, schema: Any) -> Check:
        return lambda v: not isinstance(v, list) or len(v) >= rule

    def k_maxItems(self, rule: int, schema: Any) -> Check:
        return lambda v: not isinstance(v, list) or len(v) <= rule

    def k_uniqueItems(self, rule: bool, schema: Any) -> Check:
        if not rule:
            return lambda v: True

        def check(v: Any) -> bool:
            if not isinstance(v, list):
                return True
            return not any(json_equal(v[i], v[j]) for i in range(len(v)) for j in range(i))

        return check

    def k_minLength(self, rule: int, schema: Any) -> Check:
        return lambda v: not isinstance(v, str) or len(v) >= rule

    def k_maxLength(self, rule: int, schema: Any) -> Check:
        return lambda v: not isinstance(v, str) or len(v) <= rule

    def k_pattern(self, rule: str, schema: Any) -> Check:
        compiled = re.compile(rule)
        return lambda v: not isinstance(v, str) or compiled.search(v) is not None

    def k_minimum(self, rule: float, schema: Any) -> Check:
        return lambda v: not _is_number(v) or v >= rule

    def k_maximum(self, rule: float, schema: Any) -> Check:
        return lambda v: not _is_number(v) or v <= rule

    def k_exclusiveMinimum(self, rule: float, schema: Any) -> Check:
        return lambda v: not _is_number(v) or v > rule

    def k_exclusiveMaximum(self, rule: float, schema: Any) -> Check:
        return lambda v: not _is_number(v) or v < rule

    def k_anyOf(self, rule: list[Any], schema: Any) -> Check:
        options = [self.compile(sub) for sub in rule]
        return lambda v: any(o(v) for o in options)

    def k_oneOf(self, rule: list[Any], schema: Any) -> Check:
        options = [self.compile(sub) for sub in rule]
        return lambda v: sum(1 for o in options if o(v)) == 1

    def k_allOf(self, rule: list[Any], schema: Any) -> Check:
        options = [self.compile(sub) for sub in rule]
        return lambda v: all(o(v) for o in options)

    def k_not(self, rule: Any, schema: Any) -> Check:
        inner = self.compile(rule)
        return lambda v: not inner(v)


def compile_schema(schema: Mapping[str, Any]) -> Check:
    """`schema` as a function that says whether a document is valid against it.

    Raises `UnsupportedSchema` naming a keyword or reference it cannot check."""
    return _Compiler(schema).compile(schema)

"""The compiled schema check (`lamc.schemacheck`) against jsonschema, the reference: the
two must agree on every document, valid or not, for lamc's own schemas."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.errors import IntegrityError
from lamc.schemacheck import UnsupportedSchema, compile_schema
from lamc.verify import read_manifest, schema_errors
from tests.compiled import compile_zoo


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files("lamc.schemas").joinpath(f"{name}.schema.json").read_text()
    )
    return loaded


def _agree(schema: dict[str, Any], document: Any) -> tuple[bool, bool]:
    reference = not any(jsonschema.Draft202012Validator(schema).iter_errors(document))
    return compile_schema(schema)(document), reference


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("schemacheck") / "out"
    compile_zoo("zoo:gpt2:test", out, 3, failover=1)
    loaded: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return loaded


@pytest.mark.parametrize("name", ["manifest", "topology"])
def test_lamc_schemas_use_only_supported_keywords(name: str) -> None:
    compile_schema(_schema(name))


def test_a_keyword_it_does_not_check_is_refused_when_compiled() -> None:
    with pytest.raises(UnsupportedSchema, match="'dependentRequired'"):
        compile_schema({"type": "object", "dependentRequired": {"a": ["b"]}})
    with pytest.raises(UnsupportedSchema, match="only references inside"):
        compile_schema({"$ref": "https://example.com/other.json"})


@pytest.mark.parametrize(
    ("schema", "document"),
    [
        ({"type": "integer"}, 1.0),
        ({"type": "integer"}, 1.5),
        ({"type": "integer"}, True),
        ({"type": "number"}, False),
        ({"type": ["string", "null"]}, None),
        ({"enum": [1, "a"]}, True),
        ({"enum": [1, "a"]}, 1.0),
        ({"const": [1, {"a": False}]}, [1.0, {"a": False}]),
        ({"const": [1, {"a": False}]}, [1, {"a": 0}]),
        ({"uniqueItems": True}, [1, 1.0]),
        ({"uniqueItems": True}, [True, 1]),
        ({"pattern": "b"}, "abc"),
        ({"pattern": "^b"}, "abc"),
        ({"pattern": "^b"}, 7),
        ({"minLength": 2}, "é"),
        ({"maximum": 3}, "a string"),
        ({"exclusiveMinimum": 0}, 0),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 2),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 2.5),
        ({"anyOf": [{"minimum": 5}, {"type": "string"}]}, 3),
        ({"propertyNames": {"maxLength": 1}}, {"ab": 1}),
        ({"properties": {"a": False}, "additionalProperties": False}, {"a": 1}),
        ({"properties": {"a": True}, "additionalProperties": False}, {"b": 1}),
        ({"required": ["a"]}, ["a"]),
        ({"$defs": {"n": {"type": "integer"}}, "items": {"$ref": "#/$defs/n"}}, [1, "x"]),
        (
            {
                "$defs": {"tree": {"type": "array", "items": {"$ref": "#/$defs/tree"}}},
                "$ref": "#/$defs/tree",
            },
            [[], [[]], [[[1]]]],
        ),
    ],
)
def test_json_schema_semantics_match_jsonschema(schema: dict[str, Any], document: Any) -> None:
    fast, reference = _agree(schema, document)
    assert fast == reference, (schema, document)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_manifests_are_judged_as_jsonschema_judges_them(
    manifest: dict[str, Any], data: st.DataObject
) -> None:
    document = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(document) if p]
        path = data.draw(st.sampled_from(paths))
        parent: Any = document
        for part in path[:-1]:
            parent = parent[part]
        action = data.draw(st.sampled_from(["replace", "delete", "add", "retype"]))
        key = path[-1]
        if action == "replace":
            parent[key] = data.draw(JSON_VALUES)
        elif action == "retype":
            value = parent[key]
            parent[key] = str(value) if not isinstance(value, str) else len(value)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(min_size=1, max_size=6))] = data.draw(JSON_VALUES)
        else:
            parent.append(data.draw(JSON_VALUES))
    fast, reference = _agree(_schema("manifest"), document)
    assert fast == reference


def test_a_broken_manifest_is_named_by_jsonschema(manifest: dict[str, Any], tmp_path: Path) -> None:
    broken = copy.deepcopy(manifest)
    broken["stages"][1]["precision"] = 16
    assert schema_errors(broken)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(IntegrityError, match=r"stages/1/precision: 16 is not of type 'string'"):
        read_manifest(out)

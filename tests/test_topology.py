"""Topology files: the examples load; every mistake names file, line and field (exit 3)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamc.errors import ConfigError, ExitCode, LamcError
from lamc.topology import load_topology, parse_topology

ROOT = Path(__file__).parent.parent

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "topologies").glob("*.yaml"))

VALID = """\
name: two
devices:
  - name: a
    kind: gpu
    memory: 8GiB
    peak: {fp32: 10TFLOPS, fp16: 20TFLOPS}
    memory_bandwidth: 100GB/s
    backends: [onnxruntime-cuda, onnxruntime]
  - name: b
    host: box
    kind: cpu
    memory: 4GiB
    peak: {fp32: 100GFLOPS}
    memory_bandwidth: 10GB/s
links:
  - {a: a, b: box, bandwidth: 1Gbit/s, latency: 2ms}
"""


def test_examples_load() -> None:
    assert len(EXAMPLES) >= 4
    for path in EXAMPLES:
        topology = load_topology(path)
        assert len(topology.devices) >= 2
        names = topology.names()
        # Every pair of devices in an example can reach each other.
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert topology.routes(a, b), (path.name, a, b)
        assert "#" in path.read_text()  # numbers are cited in comments


def test_units_and_defaults() -> None:
    topology = parse_topology(VALID, "two.yaml")
    a, b = topology.devices
    assert a.memory_bytes == 8 * 2**30 and a.peak("fp16") == 20e12 and a.peak("int8") == 10e12
    assert b.host == "box" and a.host == "a"
    assert (
        topology.links[0].bandwidth == pytest.approx(125e6) and topology.links[0].latency_ms == 2.0
    )
    assert a.backends == ("onnxruntime-cuda", "onnxruntime") and b.backends == ("onnxruntime",)


HOPS = """\
name: hops
devices:
  - {name: a, kind: gpu, memory: 8GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 100GB/s}
  - {name: b, host: box, kind: cpu, memory: 4GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 10GB/s}
  - {name: d, host: box, kind: cpu, memory: 4GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 10GB/s}
  - {name: c, kind: cpu, memory: 4GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 10GB/s}
links:
  - {a: a, b: box, bandwidth: 1Gbit/s, latency: 2ms}
  - {a: box, b: c, bandwidth: 100Mbit/s, latency: 5ms}
"""


def test_multi_hop_route_and_host_link() -> None:
    topology = parse_topology(HOPS, "hops.yaml")
    # a -> box -> c: latencies add up, the slowest link limits. Link ends named after a
    # device attach to the device itself; a host name attaches to the host.
    route = topology.best_route("a", "c", 1e6)
    assert route is not None and [h.b for h in route.hops] == ["host:box", "c"]
    assert topology.transfer_ms("a", "c", 1e6) == pytest.approx(2 + 5 + 1e6 / 12.5e6 * 1000)
    # b and d share host `box`: they talk over the host link (16 GB/s, 0.01 ms by default).
    assert topology.transfer_ms("b", "d", 16e9) == pytest.approx(0.01 + 1000.0)
    # With no link to c's host, there is no route at all.
    lonely = parse_topology(
        HOPS.replace("  - {a: box, b: c, bandwidth: 100Mbit/s, latency: 5ms}\n", ""), "hops.yaml"
    )
    assert lonely.routes("a", "c") == () and math.isinf(lonely.transfer_ms("a", "c", 1))


@pytest.mark.parametrize(
    ("change", "field", "line"),
    [
        (("memory: 8GiB", "memory: 0GiB"), "devices[0].memory", 5),
        (("memory: 8GiB", "memory: -8"), "devices[0].memory", 5),
        (("memory: 8GiB", "memory: .nan"), "devices[0].memory", 5),
        (("fp32: 10TFLOPS", "fp32: 0TFLOPS"), "devices[0].peak.fp32", 6),
        (
            ("memory_bandwidth: 100GB/s", "memory_bandwidth: 100 parsecs"),
            "devices[0].memory_bandwidth",
            7,
        ),
        (("{a: a, b: box", "{a: a, b: nowhere"), "links[0].b", 16),
        (("name: b\n", "name: a\n"), "devices.name", 9),
        (("kind: gpu", "kind: tpu"), "devices[0].kind", 4),
        (
            ("backends: [onnxruntime-cuda", "backends: [onnxruntime-cuba"),
            "devices[0].backends[0]",
            8,
        ),
        (
            ("    memory_bandwidth: 10GB/s\n", "    memory_bandwidth: 10GB/s\n    colour: red\n"),
            "devices[1].colour",
            15,
        ),
        (("latency: 2ms", "latency: -2ms"), "links[0].latency", 16),
        (("name: two\n", "name: two\nname: three\n"), "name", 2),
    ],
)
def test_errors_name_file_line_field(change: tuple[str, str], field: str, line: int) -> None:
    text = VALID.replace(*change)
    with pytest.raises(ConfigError) as info:
        parse_topology(text, "bad.yaml")
    assert info.value.exit_code == ExitCode.CONFIG
    assert info.value.message.startswith(f"bad.yaml:{line}: {field}:"), info.value.message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_topology(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: \(document\): invalid YAML"):
        load_topology(bad)


def test_include_a_profiled_device(tmp_path: Path) -> None:
    (tmp_path / "box.yaml").write_text(
        "lamc_device: 1\nname: box\nhost: box\nkind: cpu\nmemory: 16GiB\nmemory_bandwidth: 20GB/s\n"
        "cache: {size: 32MiB, bandwidth: 90GB/s}\npeak: {fp32: 150GFLOPS, int8: 300GFLOPS}\n"
        "efficiency:\n  fp32: {matmul: 0.9, conv: 0.8}\nop_overhead: {default: 1us, conv: 5us}\ncall_overhead: 10us\n"
    )
    (tmp_path / "topo.yaml").write_text(
        "devices:\n  - include: box.yaml\n    name: edge\n    memory: 8GiB\n"
    )
    topology = load_topology(tmp_path / "topo.yaml")
    (device,) = topology.devices
    assert device.name == "edge" and device.host == "box" and device.memory_bytes == 8 * 2**30
    assert device.op_efficiency("fp32", "matmul") == 0.9 and device.peak("int8") == 300e9
    assert device.cache_bytes == 32 * 2**20 and device.overhead_ms("conv") == pytest.approx(0.005)
    assert device.overhead_ms("matmul") == pytest.approx(
        0.001
    ) and device.call_overhead_ms == pytest.approx(0.01)


def test_constraints_and_budgets_block() -> None:
    topology = parse_topology(
        VALID
        + "constraints: {stages: 2, pin: {'h.*': a}, exclude: [b]}\nbudgets: {max_latency_ms: 50, min_memory_headroom: 10%}\n"
    )
    assert (
        topology.constraints.stages == 2
        and topology.constraints.pin == {"h.*": "a"}
        and topology.constraints.exclude == ("b",)
    )
    assert (
        topology.budgets.max_latency_ms == 50
        and topology.budgets.min_memory_headroom == pytest.approx(0.1)
    )
    with pytest.raises(ConfigError, match=r"constraints.pin.x: unknown device 'zz'"):
        parse_topology(VALID + "constraints: {pin: {x: zz}}\n")


# ---------------------------------------------------------------- random documents

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "8GiB",
            "0GiB",
            "-1GiB",
            "1Gbit/s",
            "2ms",
            "1TFLOPS",
            "nan",
            "gpu",
            "cpu",
            "a",
            "b",
            "onnxruntime",
            "10%",
            "12XB",
        ]
    ),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_device = st.fixed_dictionaries(
    {},
    optional={
        k: _value
        for k in (
            "name",
            "host",
            "kind",
            "memory",
            "peak",
            "memory_bandwidth",
            "backends",
            "efficiency",
            "op_overhead",
            "call_overhead",
            "runtime_memory",
            "cache",
            "include",
        )
    },
)
_document = st.one_of(
    _value,
    st.fixed_dictionaries(
        {},
        optional={
            "name": _value,
            "devices": st.one_of(_value, st.lists(_device, max_size=3)),
            "links": st.one_of(
                _value,
                st.lists(
                    st.fixed_dictionaries(
                        {}, optional={k: _value for k in ("a", "b", "bandwidth", "latency")}
                    ),
                    max_size=3,
                ),
            ),
            "client": _value,
            "defaults": _value,
            "constraints": _value,
            "budgets": _value,
        },
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_document)
def test_random_documents_load_or_raise_lamc_error(doc: object) -> None:
    text = yaml.safe_dump(doc)
    try:
        topology = parse_topology(text, "random.yaml")
    except LamcError:
        return
    for device in topology.devices:
        assert device.memory_bytes > 0 and math.isfinite(device.memory_bytes)
        assert all(v > 0 and math.isfinite(v) for v in device.peak_flops.values())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text_loads_or_raises_lamc_error(text: str) -> None:
    with contextlib.suppress(LamcError):
        parse_topology(text, "random.yaml")


def test_every_error_of_a_file_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "devices:\n"
        "  - {name: a, kind: cpu, memory: 0GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 1GB/s}\n"
        "  - {name: b, kind: tpu, memory: 1GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 1GB/s}\n"
        "  - {name: c, kind: cpu, memory: 1GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 1GB/s}\n"
        "links:\n"
        "  - {a: a, b: c, bandwidth: 1Gbit/s, latency: 1ms}\n"
        "  - {a: c, b: nowhere, bandwidth: 1Gbit/s, latency: 1ms}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_topology(bad)
    message = caught.value.message
    assert "3 errors" in message
    assert f"{bad}:2: devices[0].memory" in message  # the zero memory
    assert f"{bad}:3: devices[1].kind" in message  # the unknown kind
    assert f"{bad}:7: links[1].b" in message and "nowhere" in message
    # The link to the broken device `a` adds no error of its own.
    assert "links[0]" not in message


def test_a_boolean_is_not_version_1() -> None:
    with pytest.raises(ConfigError, match="unsupported version True"):
        parse_topology("lamc_topology: true\ndevices: []\n")


def test_example_topologies_match_the_json_schema_editors_use() -> None:
    import json
    from importlib import resources

    import jsonschema
    import yaml

    schema = json.loads(
        resources.files("lamc.schemas").joinpath("topology.schema.json").read_text()
    )
    validator = jsonschema.Draft202012Validator(schema)
    examples = sorted((ROOT / "examples" / "topologies").glob("*.yaml"))
    assert examples
    for path in examples:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, f"{path.name}: {errors[0].message}"
    wrong = {
        "devices": [
            {"name": "a", "kind": "tpu", "memory": "1GiB", "peak": {}, "memory_bandwidth": "1GB/s"}
        ]
    }
    assert list(validator.iter_errors(wrong))


# ------------------------------------------------------------- hostile and large documents


def test_an_alias_bomb_is_refused_at_once() -> None:
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(8):
        prev, name = chr(97 + i), chr(98 + i)
        rows.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    text = "\n".join([*rows, "devices: *i"]) + "\n"
    with pytest.raises(ConfigError, match="expands to more than") as caught:
        parse_topology(text, "bomb.yaml")
    assert len(caught.value.message) < 300  # the expanded value is never copied into it


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_topology("a: &a [*a]\ndevices: *a\n")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("memory: " + "9" * 400, "devices[0].memory"),
        ("memory: 1GiB, runtime_memory: " + "9" * 400, "devices[0].runtime_memory"),
        ("memory: 1e999GiB", "devices[0].memory"),
    ],
)
def test_huge_numbers_are_config_errors(text: str, field: str) -> None:
    doc = (
        "devices:\n  - {name: a, kind: cpu, "
        + text
        + ", peak: {fp32: 1TFLOPS}, memory_bandwidth: 1GB/s}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_topology(doc, "huge.yaml")
    assert field in caught.value.message and len(caught.value.message) < 300


def test_more_stages_than_devices_and_huge_budgets_are_refused() -> None:
    device = "devices:\n  - {name: a, kind: cpu, memory: 1GiB, peak: {fp32: 1TFLOPS}, memory_bandwidth: 1GB/s}\n"
    with pytest.raises(ConfigError, match="each device holds at most one"):
        parse_topology(device + "constraints: {stages: " + "9" * 400 + "}\n")
    with pytest.raises(ConfigError, match=r"budgets\.max_latency_ms"):
        parse_topology(device + "budgets: {max_latency_ms: " + "9" * 400 + "}\n")


def test_an_include_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text("devices:\n  - {include: /dev/zero, name: a}\n")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_topology(topology)


@st.composite
def _large_topologies(draw: st.DrawFn) -> str:
    """Up to 64 devices (a few kinds, or all different), links dense, sparse or missing,
    any unit spelling, some huge or odd numbers."""
    count = draw(st.integers(1, 64))
    kinds = draw(st.integers(1, count))
    memory = draw(st.sampled_from(["2GiB", "2048MiB", "2.5GB", str(2**31), "9" * 40, "0.5GiB"]))
    peak = draw(st.sampled_from(["1TFLOPS", "500GFLOPS", "40TOPS", "1e3GFLOPS"]))
    rows = ["lamc_topology: 1", "name: fuzz", "devices:"]
    for i in range(count):
        rows.append(
            f"  - {{name: d{i}, host: h{i}, kind: cpu, memory: {memory}, "
            f"peak: {{fp32: {peak}}}, memory_bandwidth: {10 + i % kinds}GB/s}}"
        )
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    bandwidth = draw(st.sampled_from(["1Gbit/s", "10GbE", "100MB/s", "600Mbit/s"]))
    links = [
        f"  - {{a: h{i}, b: h{j}, bandwidth: {bandwidth}, latency: {rng.uniform(0.1, 5):.2f}ms}}"
        for i in range(count)
        for j in range(i + 1, count)
        if rng.uniform() < density
    ]
    rows += ["links:", *links] if links else ["links: []"]
    return "\n".join(rows) + "\n"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_large_topologies())
def test_large_and_odd_topologies_plan_or_refuse_quickly(text: str) -> None:
    import time

    from lamc.passes.partition.planner import plan
    from tests.synthetic import chain

    started = time.perf_counter()
    try:
        topology = parse_topology(text, "fuzz.yaml")
        best, _ = plan(chain(8, params=64 * 2**20), topology)
    except LamcError:
        pass
    else:
        assert best.stages and best.stages[-1].end_unit == 8
    # Generous: a shared 2-core machine. (Memory is bounded by the search's budget;
    # benchmarks/partition.py measures it in processes of their own.)
    assert time.perf_counter() - started < 30

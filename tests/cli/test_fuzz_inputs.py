"""Fuzzing the user's inputs to `lamc run` and `lamc generate`: whatever arrives (a .npy
with a lying header, a pickled object, a struct dtype; option values that are NaN, huge,
negative or not numbers at all), lamc answers with exit 0 or a one-line usage error (2),
never a traceback (1) and never a hang."""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.cli.helpers import Outcome, lamc
from tests.compiled import compile_zoo

NPY_CASES = 200
GENERATE_CASES = 150


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "resnet"
    compile_zoo("zoo:resnet:test", out, 1)
    return out


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "gpt2"
    compile_zoo("zoo:gpt2:test,kv=1", out, 2)
    return out


def _answered(outcome: Outcome) -> None:
    """Exit 0, or 2 with a single FAILED line that says what was wrong."""
    assert outcome.code in (0, 2), outcome.stdout[-2000:] + outcome.stderr[-2000:]
    if outcome.code == 2:
        assert outcome.final.startswith("FAILED"), outcome.stdout + outcome.stderr
        assert "internal error" not in outcome.final, outcome.final
        assert "Traceback" not in outcome.stdout + outcome.stderr


_DTYPES = st.sampled_from(
    ["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool", ">f4", "<i8"]
)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _odd_array() -> st.SearchStrategy[bytes]:
    """Arrays a careless user might save: any numeric dtype and any small shape."""
    return hnp.arrays(
        _DTYPES,
        hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
    ).map(_npy)


def _right_shape(spec_shape: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    """The input's own shape, with values that include NaN and infinities."""
    return hnp.arrays(np.float32, spec_shape, elements=st.floats(width=32)).map(_npy)


def _exotic() -> st.SearchStrategy[bytes]:
    """Dtypes no model takes: objects (pickled), strings, structs, complex, datetimes."""
    samples = [
        np.array([{"a": 1}], dtype=object),
        np.array(["abc", "de"]),
        np.zeros(3, dtype=[("x", "f4"), ("y", "i4")]),
        np.zeros((1, 3, 32, 32), dtype=np.complex64),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.zeros((2, 2), dtype=("f4", (3,))),
    ]
    out = []
    for sample in samples:
        buffer = io.BytesIO()
        np.save(buffer, sample, allow_pickle=True)
        out.append(buffer.getvalue())
    return st.sampled_from(out)


@st.composite
def _mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """A valid file with its header or body edited: truncated, extended, bytes flipped, or
    the header's shape replaced by a lie (huge, negative, wrong rank)."""
    how = draw(st.sampled_from(["truncate", "extend", "flip", "shape", "magic", "header"]))
    if how == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))]
    if how == "extend":
        return base + draw(st.binary(min_size=1, max_size=64))
    if how == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "magic":
        return draw(st.binary(min_size=0, max_size=12)) + base[8:]
    end = base.index(b"}") + 1
    header = base[:end].decode("latin-1")
    if how == "shape":
        dims = draw(
            st.lists(st.integers(-(2**70), 2**70) | st.integers(0, 8), min_size=0, max_size=6)
        )
        shape = "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"
        start = header.index("'shape': ") + len("'shape': ")
        stop = header.index(")", start) + 1
        header = header[:start] + shape + header[stop:]
    else:
        header = header[:10] + draw(st.text(max_size=80)) + header[10:]
    return header.encode("latin-1", errors="replace") + base[end:]


@settings(
    max_examples=NPY_CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_npy_input_gets_exit_0_or_a_usage_error(resnet: Path, data: st.DataObject) -> None:
    from lamc.verify import read_manifest

    manifest = read_manifest(resnet)
    (name,) = manifest.inputs
    spec = manifest.tensors[name]
    shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
    valid = _npy(np.zeros(shape, np.float32))
    payload = data.draw(
        st.one_of(
            _odd_array(),
            _right_shape(shape),
            _exotic(),
            _mutated(valid),
            st.binary(max_size=256),
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        path.write_bytes(payload)
        _answered(lamc("run", str(resnet), "--input", f"{name}={path}"))


_NUMBERISH = st.one_of(
    st.integers(-(2**80), 2**80).map(str),
    st.integers(0, 8).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-inf", "1e-320", "1e308", "0x10", "", " ", "1_000", "٣"]),
    st.text(max_size=12),
)


@st.composite
def _generate_args(draw: st.DrawFn) -> list[str]:
    args: list[str] = []
    prompt = draw(
        st.one_of(
            st.lists(
                st.integers(-5, 600) | st.integers(-(2**70), 2**70), min_size=0, max_size=8
            ).map(lambda ids: ",".join(map(str, ids))),
            st.text(max_size=20),
        )
    )
    args += ["--prompt-ids", prompt]
    for option, values in [
        ("--max-new-tokens", st.integers(1, 6).map(str) | _NUMBERISH),
        ("--temperature", st.floats(0, 2).map(repr) | _NUMBERISH),
        ("--top-k", st.integers(0, 600).map(str) | _NUMBERISH),
        ("--seed", _NUMBERISH),
    ]:
        if draw(st.booleans()):
            args += [option, draw(values)]
    return args


@settings(
    max_examples=GENERATE_CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(args=_generate_args())
def test_any_generate_options_get_exit_0_or_a_usage_error(decoder: Path, args: list[str]) -> None:
    outcome = lamc("generate", str(decoder), *args)
    _answered(outcome)
    if outcome.code == 0:
        # Whatever was accepted was a valid request: a finite temperature, ids in range.
        temperature = args[args.index("--temperature") + 1] if "--temperature" in args else "0"
        assert math.isfinite(float(temperature)), args

"""Checking tensors against the manifest at every hop: name, dtype, rank, shape within the
dims' ranges (one binding per request: `batch` is the same everywhere), byte length."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from lamc.dims import UnresolvedDim, eval_dim
from lamc.errors import UsageError
from lamc.manifest import DimRange, Manifest, StageSpec, TensorSpec


class TensorMismatch(UsageError):
    """A tensor that is not what the manifest says: wrong name, dtype, rank or shape."""


def describe(spec: TensorSpec) -> str:
    return f"{spec.dtype}[{', '.join(str(d) for d in spec.shape)}]"


def check(
    spec: TensorSpec,
    array: object,
    dims: Mapping[str, DimRange],
    binding: dict[str, int],
    where: str,
) -> np.ndarray:
    """Check one tensor; binds its symbolic dims into `binding`. Returns it C-contiguous."""
    if not isinstance(array, np.ndarray):
        raise TensorMismatch(
            f"{where}: {spec.name}: expected a numpy array {describe(spec)}, got {type(array).__name__}"
        )
    if array.dtype != np.dtype(spec.dtype):
        raise TensorMismatch(
            f"{where}: {spec.name}: expected dtype {spec.dtype}, got {array.dtype}"
        )
    if array.ndim != len(spec.shape):
        raise TensorMismatch(
            f"{where}: {spec.name}: expected rank {len(spec.shape)} {describe(spec)}, got rank {array.ndim} {list(array.shape)}"
        )
    deferred: list[tuple[int, str, int]] = []
    for axis, (dim, size) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(dim, int):
            if size != dim:
                raise TensorMismatch(
                    f"{where}: {spec.name}: expected size {dim} on axis {axis} of {describe(spec)}, got {list(array.shape)}"
                )
        elif dim in dims:
            bounds = dims[dim]
            if not bounds.min <= size <= bounds.max:
                raise TensorMismatch(
                    f"{where}: {spec.name}: expected {dim} in {bounds.min}..{bounds.max} on axis {axis}, got {size}"
                )
            if binding.setdefault(dim, size) != size:
                raise TensorMismatch(
                    f"{where}: {spec.name}: expected {dim} = {binding[dim]} (as in the other tensors), got {size} on axis {axis}"
                )
        else:
            deferred.append((axis, dim, size))
    for axis, expression, size in deferred:
        try:
            expected = eval_dim(expression, binding)
        except UnresolvedDim:
            continue  # a dim no other tensor has bound yet; checked where it is bound
        if expected != size:
            raise TensorMismatch(
                f"{where}: {spec.name}: expected {expression} = {expected} on axis {axis}, got {size}"
            )
    if spec.range is not None and array.size:
        low, high = spec.range
        smallest, largest = int(array.min()), int(array.max())
        if smallest < low or largest >= high:
            bad = smallest if smallest < low else largest
            raise TensorMismatch(
                f"{where}: {spec.name}: expected values in {low}..{high - 1}, got {bad}"
            )
    if array.nbytes != array.size * array.dtype.itemsize:
        raise TensorMismatch(
            f"{where}: {spec.name}: byte length {array.nbytes} does not match its shape"
        )
    # (ascontiguousarray would turn a 0-d tensor into shape [1]; require keeps it 0-d.)
    return np.require(array, requirements="C")


def check_all(
    names: Iterable[str],
    specs: Mapping[str, TensorSpec],
    tensors: Mapping[str, np.ndarray],
    dims: Mapping[str, DimRange],
    binding: dict[str, int],
    where: str,
) -> dict[str, np.ndarray]:
    """Check that exactly the named tensors are present and each matches its spec."""
    wanted = list(names)
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise TensorMismatch(
            f"{where}: missing tensor(s) {', '.join(missing)}; expected {', '.join(wanted)}"
        )
    return {name: check(specs[name], tensors[name], dims, binding, where) for name in wanted}


def warm_up_feeds(
    manifest: Manifest, spec: StageSpec, smallest: bool = False
) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """A stage's inputs at the plan's binding (the dims' smallest sizes where it has none;
    every dim at its smallest size with `smallest`): random floats, zeros for integers,
    and shape tensors at the value the manifest records for them (so a Reshape downstream
    gets a valid target)."""
    binding = {name: max(bounds.min, 1) for name, bounds in manifest.dims.items()}
    if not smallest:
        plan = manifest.plan.get("binding", {})
        binding.update({k: v for k, v in plan.items() if k in binding})
    rng = np.random.default_rng(0)
    feeds = {}
    for name in spec.inputs:
        tensor = manifest.tensors[name]
        shape = tuple(eval_dim(d, binding) for d in tensor.shape)
        dtype = np.dtype(tensor.dtype)
        if tensor.value is not None:
            values = [eval_dim(v, binding) for v in tensor.value]
            feeds[name] = np.array(values, dtype=dtype).reshape(shape)
        else:
            feeds[name] = (
                np.zeros(shape) if dtype.kind in "iub" else rng.standard_normal(shape)
            ).astype(dtype)
    return binding, feeds

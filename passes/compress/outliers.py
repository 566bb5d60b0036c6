"""Activation outliers for the int8 methods: measured per input channel on calibration
samples, then split off into a float32 MatMul or kept whole in float32.

One quantisation range per tensor cannot hold both a few huge values and the bulk (a
transformer's FFN down-projection, fed by GELU, is the usual case). The outlier ratio
max|x| / rms(x) of each weight MatMul's input is measured per channel; above the method's
bar the 8-bit step exceeds ~5% of the tensor's RMS. What was split or kept is recorded in
the model's metadata (`lamc.int8.kept_fp32`, `lamc.int8.split_channels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from lamc.passes.compress.common import (
    fold_transposed_weights,
    named_nodes,
    toposort,
    weighted_matmuls,
)


@dataclass
class ChannelStats:
    """A MatMul input's magnitudes over the samples, per input channel (last axis)."""

    peak: np.ndarray  # max |x| per channel
    squares: np.ndarray  # sum of x^2 per channel
    rows: int  # values per channel

    def ratio(self, drop: int = 0) -> float:
        """max|x| / rms(x) over the channels left when the `drop` largest are taken out."""
        keep = np.argsort(self.peak)[: len(self.peak) - drop]
        if keep.size == 0:
            return 0.0
        rms = float(np.sqrt(self.squares[keep].sum() / (self.rows * keep.size)))
        return float(self.peak[keep].max()) / rms if rms > 0 else 0.0

    def largest(self, count: int) -> list[int]:
        return sorted(int(c) for c in np.argsort(self.peak)[::-1][:count])


def activation_stats(
    model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]
) -> dict[str, ChannelStats]:
    """Per-channel statistics of each weighted MatMul's input over `samples`, by node name
    (float activations only)."""
    from lamc.backends.onnxruntime.run import new_session

    nodes = weighted_matmuls(model)
    if not samples or not nodes:
        return {}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in probe.graph.output}
    activations = sorted({n.input[0] for n in nodes})
    for name in activations:
        if name not in outputs:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    session = new_session(probe.SerializeToString(), optimization="basic")
    wanted = [o.name for o in session.get_outputs() if o.name in set(activations)]
    inputs = [i.name for i in session.get_inputs()]
    stats: dict[str, ChannelStats] = {}
    for sample in samples:
        for name, value in zip(wanted, session.run(wanted, {n: sample[n] for n in inputs})):
            if not np.issubdtype(value.dtype, np.floating) or value.size == 0:
                continue
            x = value.astype(np.float64).reshape(-1, value.shape[-1])
            peak, squares = np.abs(x).max(0), np.square(x).sum(0)
            seen = stats.get(name)
            if seen is None:
                stats[name] = ChannelStats(peak, squares, x.shape[0])
            elif seen.peak.shape == peak.shape:
                np.maximum(seen.peak, peak, out=seen.peak)
                seen.squares += squares
                seen.rows += x.shape[0]
    return {n.name: stats[n.input[0]] for n in nodes if n.input[0] in stats}


def outlier_ratios(
    model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """max|x| / rms(x) of each weighted MatMul's input activation over `samples`."""
    return {name: st.ratio() for name, st in activation_stats(model, samples).items()}


@dataclass
class OutlierPlan:
    """What an int8 pass does about activation outliers: MatMuls kept whole in float32,
    and MatMuls whose few outlier input channels are split off into a float32 MatMul."""

    kept: list[str]
    split: dict[str, list[int]]

    @property
    def fp32_parts(self) -> list[str]:
        return [f"{name}.outliers" for name in self.split]


def plan_outliers(
    model: onnx.ModelProto,
    samples: list[dict[str, np.ndarray]],
    limit: float,
    max_split: float = 1 / 64,
) -> OutlierPlan:
    """For each weighted MatMul whose input's max|x| / rms(x) is over `limit`: the fewest
    largest channels (at most `max_split` of them) whose removal brings it under; when
    none do, the whole MatMul stays float32. Gemm is never split."""
    constants = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in weighted_matmuls(model)}
    kept: list[str] = []
    split: dict[str, list[int]] = {}
    for name, st in sorted(activation_stats(model, samples).items()):
        if st.ratio() <= limit:
            continue
        node = nodes[name]
        weight = constants[node.input[1]]
        channels = len(st.peak)
        can_split = (
            node.op_type == "MatMul" and len(weight.dims) == 2 and weight.dims[0] == channels
        )
        most = max(1, int(channels * max_split)) if can_split and max_split > 0 else 0
        drop = next((k for k in range(1, most + 1) if st.ratio(k) <= limit), None)
        if drop is None:
            kept.append(name)
        else:
            split[name] = st.largest(drop)
    return OutlierPlan(kept, split)


def split_outlier_channels(model: onnx.ModelProto, plan: OutlierPlan) -> onnx.ModelProto:
    """`y = x @ W` -> `y = (x * mask) @ W + x[..., J] @ W[J]`: the first MatMul sees no
    outliers (their channels masked to zero) and is quantised; the second, over the few
    outlier channels J, stays float32. Exact in float arithmetic."""
    if not plan.split:
        return model
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    added: list[onnx.NodeProto] = []
    for node in graph.node:
        channels = plan.split.get(node.name)
        if channels is None:
            continue
        weight = numpy_helper.to_array(constants[node.input[1]])
        mask = np.ones(weight.shape[0], dtype=weight.dtype)
        mask[channels] = 0
        prefix = f"{node.name}.outliers"
        graph.initializer.extend(
            [
                numpy_helper.from_array(mask, f"{prefix}.mask"),
                numpy_helper.from_array(np.asarray(channels, dtype=np.int64), f"{prefix}.channels"),
                numpy_helper.from_array(np.ascontiguousarray(weight[channels]), f"{prefix}.weight"),
            ]
        )
        x, y = node.input[0], node.output[0]
        added += [
            onnx.helper.make_node(
                "Mul", [x, f"{prefix}.mask"], [f"{prefix}.bulk_in"], name=f"{prefix}.mask"
            ),
            onnx.helper.make_node(
                "Gather",
                [x, f"{prefix}.channels"],
                [f"{prefix}.in"],
                name=f"{prefix}.gather",
                axis=-1,
            ),
            onnx.helper.make_node(
                "MatMul", [f"{prefix}.in", f"{prefix}.weight"], [f"{prefix}.out"], name=prefix
            ),
            onnx.helper.make_node(
                "Add", [f"{prefix}.bulk_out", f"{prefix}.out"], [y], name=f"{prefix}.add"
            ),
        ]
        node.input[0] = f"{prefix}.bulk_in"
        node.output[0] = f"{prefix}.bulk_out"
    graph.node.extend(added)
    return toposort(model)


def record(model: onnx.ModelProto, plan: OutlierPlan) -> onnx.ModelProto:
    if plan.kept:
        entry = model.metadata_props.add()
        entry.key, entry.value = "lamc.int8.kept_fp32", ",".join(plan.kept)
    if plan.split:
        entry = model.metadata_props.add()
        entry.key = "lamc.int8.split_channels"
        entry.value = ",".join(f"{n}:{len(c)}" for n, c in sorted(plan.split.items()))
    return model


def outlier_handling(model: onnx.ModelProto) -> OutlierPlan:
    """What an int8 pass recorded in `model`: MatMuls kept in float32, and MatMuls with
    outlier channels split off (channel counts only; indices as -1)."""
    meta = {e.key: e.value for e in model.metadata_props}
    kept = [n for n in meta.get("lamc.int8.kept_fp32", "").split(",") if n]
    split = {}
    for item in meta.get("lamc.int8.split_channels", "").split(","):
        if item:
            name, _, count = item.rpartition(":")
            split[name] = [-1] * int(count)
    return OutlierPlan(kept, split)


def prepare_int8(
    model: onnx.ModelProto,
    samples: list[dict[str, np.ndarray]],
    limit: float,
    max_split: float = 1 / 64,
) -> tuple[onnx.ModelProto, OutlierPlan]:
    model = fold_transposed_weights(named_nodes(model))
    plan = plan_outliers(model, samples, limit, max_split)
    return split_outlier_channels(model, plan), plan

"""Compression of one stage's model: fp16, int8 (dynamic), int4 weight-only, low-rank.

Each method maps an ONNX model to a smaller one computing (nearly) the same function; the
stage's inputs and outputs keep their dtypes, so the stage boundaries stay as the
manifest says. ONNX Runtime's quantisation tools and onnxconverter-common do the work
where they can; the low-rank factorisation is lamc's own.

| method        | weights                     | compute                                  |
|---------------|-----------------------------|------------------------------------------|
| fp32          | as captured                 | as captured                              |
| fp16          | float16                     | float16, but LayerNorm/Softmax/reductions and the stage's inputs and outputs in float32 |
| int8-dynamic  | MatMul/Gemm/Gather weights int8 per channel (7-bit range) | activations quantised per call (DynamicQuantizeMatMul / MatMulInteger) |
| int8-static   | QDQ: weights int8 per channel (7-bit range) | activations int8 with ranges from calibration inputs |
| int4-weight   | MatMul weights 4-bit, blocks of 32 (or 128), fp32 scales | MatMulNBits (dequantised in the kernel) |
| lowrank       | large MatMul weights W ~ A @ B (SVD, rank by retained energy) | two MatMuls |

Activation outliers: one quantisation range per tensor cannot hold both a few huge values
and the bulk (a transformer's FFN down-projection, fed by GELU, is the usual case). The
outlier ratio max|x| / rms(x) of each weight MatMul's input is measured per channel on the
calibration samples (generated ones by default); above `Options.outlier_ratio` (48) the
8-bit step exceeds ~5% of the tensor's RMS. int8-dynamic then splits the fewest largest
channels (at most 1/64 of them) off into a float32 MatMul, `x @ W = (x * mask) @ W +
x[..., J] @ W[J]`, and quantises the rest; when that is not enough the MatMul stays fp32.
int8-static keeps such MatMuls whole in float32, at a lower bar (`static_outlier_ratio`,
20): its ranges are fixed at calibration, so inputs unlike the samples clip as well. Weights use a
7-bit range (`reduce_range`): x86 CPUs without VNNI multiply u8 x s8 with 16-bit
intermediate sums (VPMADDUBSW) that saturate at the full 8-bit range. The names kept in
float32 or split are recorded in the model's metadata (`lamc.int8.kept_fp32`,
`lamc.int8.split_channels`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lamc.precision import METHODS, CompressionError

# Methods that use calibration inputs (each stage's arriving tensors): activation ranges
# (int8-static) and outlier detection (both int8 methods).
CALIBRATED = ("int8-dynamic", "int8-static")
# Ops that stay in float32 under fp16: statistics and normalisations that overflow or lose
# too much in half precision.
FP32_OPS = [
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Erf",
    "Exp",
    "Range",
    "CumSum",
]


@dataclass(frozen=True)
class Options:
    block_size: int = 32  # int4-weight: 32 or 128
    energy: float = 0.99  # lowrank: fraction of the squared singular values kept
    min_dim: int = 256  # lowrank / int4: leave smaller weights as they are
    # int8: max|x| / rms(x) of a MatMul's input above which it stays fp32. Static ranges
    # are fixed at calibration, so inputs unlike the samples clip as well: a lower bar.
    outlier_ratio: float = 48.0
    static_outlier_ratio: float = 20.0


def compress(
    model: onnx.ModelProto,
    method: str,
    options: Options | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """`model` (weights inline) compressed with `method`; the input is not modified.
    `calibration`: samples of the model's inputs (int8-static)."""
    options = options or Options()
    if method not in METHODS:
        raise CompressionError(f"unknown compression {method!r}; methods: {', '.join(METHODS)}")
    if method == "fp32":
        return model
    if method == "fp16":
        return _fp16(model)
    if method == "int8-dynamic":
        return _int8_dynamic(model, calibration or [], options)
    if method == "int8-static":
        if not calibration:
            raise CompressionError("int8-static needs calibration inputs")
        return _int8_static(model, calibration, options)
    if method == "int4-weight":
        return _int4(model, options)
    return lowrank(model, options)


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers import float16

    converted: onnx.ModelProto = float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)),
        disable_shape_infer=True,
    )
    # Intermediate type annotations are stale after the conversion: let ONNX infer them.
    del converted.graph.value_info[:]
    return toposort(converted)


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder the graph's nodes so every value is produced before it is used (the fp16
    converter appends its casts at the end)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in ready})[:5]
            raise CompressionError(f"graph has a cycle or undefined values: {', '.join(missing)}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def fold_transposed_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """`MatMul(x, Transpose(W))` with a constant W (a tied lm_head) -> `MatMul(x, W.T)` with
    W.T stored, so that weight quantisers, which need a constant B, see it."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    drop = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits or node.output[0] in outputs:
            continue
        consumers = users.get(node.output[0], [])
        if not consumers or any(
            c.op_type != "MatMul" or list(c.input).index(node.output[0]) != 1 for c in consumers
        ):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        value = numpy_helper.to_array(inits[node.input[0]])
        folded = np.ascontiguousarray(np.transpose(value, perm) if perm else value.T)
        graph.initializer.append(numpy_helper.from_array(folded, node.output[0]))
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    still_used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_used or t.name in outputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def weighted_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul/Gemm nodes whose B is a constant (what weight quantisation touches)."""
    constants = {t.name for t in model.graph.initializer}
    return [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in constants
    ]


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


def _record(model: onnx.ModelProto, plan: OutlierPlan) -> onnx.ModelProto:
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


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every node named (quantisers select nodes by name)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    taken = {n.name for n in model.graph.node if n.name}
    for k, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def _prepare_int8(
    model: onnx.ModelProto,
    samples: list[dict[str, np.ndarray]],
    limit: float,
    max_split: float = 1 / 64,
) -> tuple[onnx.ModelProto, OutlierPlan]:
    model = fold_transposed_weights(_named(model))
    plan = plan_outliers(model, samples, limit, max_split)
    return split_outlier_channels(model, plan), plan


def _int8_dynamic(
    model: onnx.ModelProto, samples: list[dict[str, np.ndarray]], options: Options
) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, plan = _prepare_int8(model, samples, options.outlier_ratio)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(
            model,
            out,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            nodes_to_exclude=plan.kept + plan.fp32_parts,
            extra_options={"MatMulConstBOnly": True},
        )
        return _record(onnx.load(str(out)), plan)


def _int8_static(
    model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]], options: Options
) -> onnx.ModelProto:
    """QDQ int8 with activation ranges from `calibration`. ONNX Runtime's calibrator makes
    sessions of its own, which a process using one global thread pool (lamc's multi-stage
    executor) cannot create: it runs in a fresh child process."""
    import concurrent.futures
    import multiprocessing

    # No channel splitting: the bulk's range would still be fixed at calibration, and on
    # MiniLM splitting measured worse than keeping those MatMuls whole (worst sentence
    # cosine 0.983 vs 0.996).
    model, plan = _prepare_int8(model, calibration, options.static_outlier_ratio, max_split=0)
    skip = set(plan.kept + plan.fp32_parts)
    quantized = [n.name for n in weighted_matmuls(model) if n.name not in skip]
    with tempfile.TemporaryDirectory() as tmp:
        src, out, data = Path(tmp) / "in.onnx", Path(tmp) / "q.onnx", Path(tmp) / "cal.npz"
        onnx.save_model(
            model,
            str(src),
            save_as_external_data=True,
            location="in.onnx.data",
            size_threshold=1024,
        )
        names = [i.name for i in model.graph.input]
        arrays: dict[str, Any] = {
            f"{k}/{n}": s[n] for k, s in enumerate(calibration) for n in names
        }
        np.savez(data, **arrays)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            pool.submit(_int8_static_files, str(src), str(out), str(data), quantized).result()
        return _record(onnx.load(str(out)), plan)


def _int8_static_files(src: str, out: str, data: str, nodes: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(src)
    arrays = np.load(data)
    samples: dict[str, dict[str, np.ndarray]] = {}
    for key in arrays.files:
        index, _, name = key.partition("/")
        samples.setdefault(index, {})[name] = arrays[key]
    ordered = [samples[k] for k in sorted(samples, key=int)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(ordered)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.samples, None)

    # `nodes`: weight MatMuls only (attention's activation x activation products, softmax
    # probabilities above all, lose too much in int8), less those with activation outliers.
    quantize_static(
        model,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_quantize=nodes,
        extra_options={"MatMulConstBOnly": True},
    )


def _int4(model: onnx.ModelProto, options: Options) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if options.block_size not in (32, 64, 128):
        raise CompressionError(f"int4-weight block size {options.block_size}: use 32 or 128")
    quantizer = MatMulNBitsQuantizer(
        fold_transposed_weights(onnx.ModelProto.FromString(model.SerializeToString())),
        bits=4,
        block_size=options.block_size,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    result: onnx.ModelProto = quantizer.model.model
    return result


def lowrank(model: onnx.ModelProto, options: Options) -> onnx.ModelProto:
    """Replace `MatMul(x, W)` with a constant 2-D W of at least `min_dim` on both sides by
    `MatMul(MatMul(x, A), B)`, A = U_r S_r, B = V_r^T, with the smallest rank r that keeps
    `energy` of sum(s^2), when that stores fewer numbers than W."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes = []
    drop: set[str] = set()
    for node in graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        tensor = inits.get(w_name)
        if tensor is None or consumers.get(w_name, 0) != 1 or len(tensor.dims) != 2:
            new_nodes.append(node)
            continue
        k, n = tensor.dims
        if min(k, n) < options.min_dim or tensor.data_type != onnx.TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(tensor).astype(np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        energy = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-30)
        rank = int(np.searchsorted(energy, options.energy) + 1)
        if rank * (k + n) >= k * n:
            new_nodes.append(node)
            continue
        a = (u[:, :rank] * s[:rank]).astype(np.float32)
        b = vt[:rank].astype(np.float32)
        a_name, b_name, mid = (
            f"{w_name}.lowrank_a",
            f"{w_name}.lowrank_b",
            f"{node.output[0]}.lowrank",
        )
        graph.initializer.extend(
            [numpy_helper.from_array(a, a_name), numpy_helper.from_array(b, b_name)]
        )
        drop.add(w_name)
        new_nodes.append(
            onnx.helper.make_node(
                "MatMul", [node.input[0], a_name], [mid], name=f"{node.name}.lowrank_a"
            )
        )
        new_nodes.append(
            onnx.helper.make_node(
                "MatMul", [mid, b_name], list(node.output), name=node.name or f"{w_name}.lowrank_b"
            )
        )
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model

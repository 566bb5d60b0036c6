"""Synthetic workloads for planner tests: units of known size, no capture needed."""

from __future__ import annotations

from lamc.workload import Cut, CutTensor, OpWork, Unit, Workload


def chain(
    n: int,
    *,
    flops: float = 1e9,
    params: int = 100 * 2**20,
    cut: int = 1 << 20,
    names: list[str] | None = None,
) -> Workload:
    """n equal units in a chain: each `flops` of compute-bound matmul work, `params` bytes
    of weights stored, and `cut` bytes crossing every boundary."""
    names = names or [f"block.{i}" for i in range(n)]
    units = tuple(
        Unit(
            index=i,
            name=names[i],
            kind="block",
            module_class="Block",
            nodes=1,
            flops=flops,
            matrix_flops=flops,
            param_bytes=params,
            peak_activation_bytes=cut * 2,
            ops=(OpWork("matmul", flops, 0.0, "fp32", 0.0),),
            params=(f"w{i}",),
        )
        for i in range(n)
    )
    cuts = tuple(Cut(k, (CutTensor(f"t{k}", "float", (cut // 4,), cut),)) for k in range(n + 1))
    return Workload(name="synthetic", binding={}, units=units, cuts=cuts)


def device_yaml(
    name: str,
    *,
    tflops: float = 1.0,
    memory: str = "16GiB",
    host: str | None = None,
    bandwidth: str = "100GB/s",
) -> str:
    return (
        f"  - {{name: {name}, host: {host or name}, kind: cpu, memory: {memory}, peak: {{fp32: {tflops}TFLOPS}}, "
        f"memory_bandwidth: {bandwidth}, efficiency: {{fp32: {{matmul: 1.0}}}}, op_overhead: 0us, call_overhead: 0us, runtime_memory: 0B}}\n"
    )

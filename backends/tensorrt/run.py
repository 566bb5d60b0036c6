"""TensorRT on the edge: deserialize a stage's engine and run it. Imports numpy,
tensorrt and cuda-python (for device memory), nothing else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lamc.errors import RuntimeEnvironmentError


def is_available() -> bool:
    from lamc.backends.tensorrt.build import is_available as can_build

    return can_build()


@dataclass
class Runner:
    engine: Any
    context: Any
    cudart: Any
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        buffers: list[int] = []
        try:
            for name in self.input_names:
                array = np.require(feeds[name], requirements="C")
                self.context.set_input_shape(name, array.shape)
                pointer = _malloc(cudart, array.nbytes)
                buffers.append(pointer)
                _check(
                    cudart.cudaMemcpy(
                        pointer,
                        array.ctypes.data,
                        array.nbytes,
                        cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    )
                )
                self.context.set_tensor_address(name, pointer)
            outputs: dict[str, np.ndarray] = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = np.dtype(_numpy_dtype(self.engine.get_tensor_dtype(name)))
                outputs[name] = np.empty(shape, dtype=dtype)
                pointer = _malloc(cudart, max(outputs[name].nbytes, 1))
                buffers.append(pointer)
                self.context.set_tensor_address(name, pointer)
            if not self.context.execute_async_v3(0):
                raise RuntimeError("TensorRT execution failed")
            _check(cudart.cudaStreamSynchronize(0))
            for name, array in outputs.items():
                pointer = self.context.get_tensor_address(name)
                _check(
                    cudart.cudaMemcpy(
                        array.ctypes.data,
                        pointer,
                        array.nbytes,
                        cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    )
                )
            return outputs
        finally:
            for pointer in buffers:
                cudart.cudaFree(pointer)


def load(
    engine_path: str,
    providers: Sequence[str] = (),
    *,
    threads: int = 0,
    optimization: str = "all",
    shared_pool: bool = False,
) -> Runner:
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise RuntimeEnvironmentError(
            f"this stage is a TensorRT engine and {exc.name} is not installed",
            hint="pip install 'lamc[tensorrt]' cuda-python",
        ) from None
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(engine_path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise RuntimeEnvironmentError(
            f"{engine_path}: this GPU or TensorRT version cannot load the engine",
            hint="rebuild it on this device: lamc build-engines OUT",
        )
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    return Runner(engine, context, cudart, inputs, outputs)


def _malloc(cudart: Any, nbytes: int) -> int:
    err, pointer = cudart.cudaMalloc(nbytes)
    _check((err,))
    return int(pointer)


def _check(result: Any) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")


def _numpy_dtype(trt_dtype: Any) -> str:
    import tensorrt as trt

    table = {
        trt.float32: "float32",
        trt.float16: "float16",
        trt.int32: "int32",
        trt.int64: "int64",
        trt.int8: "int8",
        trt.bool: "bool",
    }
    return table.get(trt_dtype, "float32")

"""The compile side of lamc: analysis, planning and the compile driver, on top of the
frontends, passes and backends. The Python API a user scripts against:

    from lamc.compiler import CompileOptions, analyse, compile_model, plan_model
"""

from lamc.compiler.analysis import Analysed, analyse, attach_kv_bytes, decode_workload
from lamc.compiler.driver import CompileOptions, CompileResult, compile_model
from lamc.compiler.planning import plan_model, prepare_request, with_compression

__all__ = [
    "Analysed",
    "CompileOptions",
    "CompileResult",
    "analyse",
    "attach_kv_bytes",
    "compile_model",
    "decode_workload",
    "plan_model",
    "prepare_request",
    "with_compression",
]

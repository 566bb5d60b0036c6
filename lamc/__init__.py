"""lamc: a compiler for large AI models onto heterogeneous edge devices.

This package root stays import-light: the edge executor (`lamc.runtime`) imports it and
must never pull in torch, onnx or networkx.
"""

__version__ = "0.1.0"

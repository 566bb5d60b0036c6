"""Backends: slice the partitioned IR into stage models and build an engine per stage.

Each backend has two faces in two modules: `build.py` runs on the compile host, `run.py`
runs on the edge and imports only numpy and its runtime library. This package's
`__init__` stays empty so that the executor can import a `run` module without pulling in
onnx or torch.
"""

# lamc: the first two commands on a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lamc-installed
# The CPU build of torch, installed before the project so nothing pulls a CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo test test-fast lint typecheck layers pytest bench proto clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=23.2"
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	# An editable install leaves lamc's own modules uncompiled, and where
	# PYTHONDONTWRITEBYTECODE is set every start compiles them again (a stage server's
	# cold start imports about a hundred of them): compile them once here.
	$(BIN)/python -m compileall -q lamc passes backends models > /dev/null
	# The stubs declare tensorrt as a dependency, which cannot be built without NVIDIA's index.
	$(BIN)/pip install --quiet --no-deps "tensorrt-stubs>=10"
	@$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} was installed instead of $(TORCH)')"
	touch $(STAMP)

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: install lint pytest

lint: install
	$(BIN)/ruff check lamc passes backends models tests benchmarks examples scripts
	$(BIN)/ruff format --check lamc passes backends models tests benchmarks examples scripts
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory layers

# mypy checks a tree laid out as the package installs (package-dir mapping), with the
# TensorRT backend checked against tensorrt-stubs (see scripts/typecheck_tree.py).
typecheck: install
	$(BIN)/python scripts/typecheck_tree.py
	cd build/typecheck && MYPYPATH=stubs "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" -p lamc

# The floors of DESIGN.md as import-linter contracts (pyproject.toml), on the same tree.
layers: install
	$(BIN)/python scripts/typecheck_tree.py
	cd build/typecheck && PYTHONPATH=. "$(CURDIR)/$(BIN)/lint-imports" --config "$(CURDIR)/pyproject.toml" --no-cache

# Two workers (pytest-xdist), a test file each at a time: the suite takes about 14
# minutes on 2 cores instead of 24. Test ports come from a range per worker
# (tests/runtime/servers.py). Files are handed out longest first (tests/durations.json,
# read by tests/conftest.py), not by their number of tests (xdist's reordering is off).
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

pytest: install
	$(BIN)/pytest -q $(PYTEST_ARGS) --durations=20

# The inner loop: lint, types, layers and every test but the slow end-to-end ones.
test-fast: install lint
	$(BIN)/pytest -q $(PYTEST_ARGS) -m "not slow"

# The KServe v2 descriptor set the ingress loads, compiled from its .proto
# (tests/runtime/test_kserve.py checks that the two agree).
proto: install
	$(BIN)/python -m grpc_tools.protoc -I lamc/protos --descriptor_set_out=lamc/protos/grpc_predict_v2.binpb grpc_predict_v2.proto

bench: install
	$(BIN)/python benchmarks/capture.py

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache *.egg-info

#!/usr/bin/env bash
# The demo: compile gpt2-small for four mini-PCs, run the pipeline, check it against PyTorch.
# (The stages all run here, in one process; `lamc serve` puts each on its own host.)
set -euo pipefail
out="${DEMO_OUT:-demo-out/gpt2}"
topology=examples/topologies/4x-minipc-1gbe.yaml

echo "== lamc compile: capture, plan (printed below), slice, build, manifest"
lamc compile zoo:gpt2 --topology "$topology" -o "$out"
echo
echo "== lamc inspect: what the manifest pins"
lamc inspect "$out"
echo
echo "== lamc run: verify every hash, load each stage, run one request"
lamc run "$out" --random
echo
echo "== lamc validate: the pipeline against the PyTorch model on the same inputs"
lamc validate "$out"

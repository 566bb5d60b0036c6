#!/usr/bin/env bash
# The demo: what lamc sees in gpt2-small (later steps compile, run and validate it).
set -euo pipefail
lamc inspect zoo:gpt2

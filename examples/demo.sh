#!/usr/bin/env bash
# The demo: what lamc sees in gpt2-small.
set -euo pipefail
lamc inspect zoo:gpt2

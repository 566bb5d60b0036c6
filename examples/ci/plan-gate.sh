#!/usr/bin/env bash
# A CI gate: fail the build when the plan for the target devices breaks a budget.
#   examples/ci/plan-gate.sh MODEL TOPOLOGY [more lamc plan options]
# lamc exits 6 (and prints why) when no plan meets the budgets, 3 on a bad topology,
# 4 when the model does not capture; the plan is kept as plan.json for review.
set -euo pipefail
model="${1:?model}"
topology="${2:?topology}"
shift 2
lamc plan "$model" --topology "$topology" \
  --max-latency-ms "${MAX_LATENCY_MS:-250}" \
  --min-throughput "${MIN_THROUGHPUT:-5}" \
  --min-memory-headroom "${MIN_HEADROOM:-20%}" \
  --json "$@" > plan.json

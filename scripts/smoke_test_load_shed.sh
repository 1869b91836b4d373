#!/usr/bin/env bash
# Load shedding: with a low MAX_CONCURRENCY (try 1) and a slow upstream, expect some 503.
# Env: HOST, KEY (stress), REQUESTS (40), PARALLEL (20).
set -euo pipefail
source "$(dirname "$0")/smoke_lib.sh"
KEY="${KEY:-stress}"; REQUESTS="${REQUESTS:-40}"; PARALLEL="${PARALLEL:-20}"
hint="start the gateway with RPS=0 MAX_CONCURRENCY=1 LATENCY_MS=300 make run"
codes=$(burst "$REQUESTS" "$PARALLEL" "200 503") || { echo "($hint)"; exit 1; }
if [ "$(count "$codes" 503)" -eq 0 ]; then echo "FAIL: expected some 503 (server overloaded; $hint)"; exit 1; fi
echo "OK: load shedding"
